// How the CRM publishes `subscription.changed` for wechat-notifier's grant
// ledger (contract section 8.1): one event per answer of the mini program's
// subscription dialog, so the ledger counts the user's credits and releases
// the notices it holds for want of one the moment an accept arrives.
//
// The mini program reports each answer (`POST /wechat/subscriptions`, see
// subscriptions.controller.ts) with an `answer_id` it keeps until the CRM took
// the report; the event id is derived from the user and that id, so a report
// sent twice is one event, and the ledger counts it once. The openid is the
// one the CRM stored at the login binding, never one the client posts.
//
// Same broker rules as customer.assigned: persistent JSON, message_id = event
// id, a confirm channel, `mandatory` (with the ledger on, the notifier binds
// its work queue to this key, so an unroutable event means it is not running
// with the ledger, or not at all).
import { Injectable, OnModuleDestroy, OnModuleInit } from '@nestjs/common';
import { createHash } from 'node:crypto';
import { CrmEventsChannel } from './crm-events.channel';
import { rfc3339 } from './customer-assigned.publisher';

export const SUBSCRIPTION_ROUTING_KEY = 'subscription.changed';

/** The ledger's three words: one more credit, no change, no credit left. */
export type SubscriptionStatus = 'accept' | 'reject' | 'off';

export interface SubscriptionChangedEvent {
  event_id: string;
  event_type: 'subscription.changed';
  occurred_at: string;
  user: { user_id: string; openid?: string };
  template_id: string;
  status: SubscriptionStatus;
}

/** One answer as the mini program reports it (miniprogram/utils/report.js). */
export interface SubscriptionAnswer {
  answer_id: string;
  template_id: string;
  status: SubscriptionStatus;
}

const STATUSES: readonly string[] = ['accept', 'reject', 'off'];

/** Why a posted answer cannot become an event, or null when it can. */
export function answerProblem(body: unknown): string | null {
  const b = body as Partial<Record<keyof SubscriptionAnswer, unknown>> | null;
  if (!b || typeof b !== 'object') return 'the body must be a JSON object';
  if (typeof b.answer_id !== 'string' || !/^[A-Za-z0-9_-]{1,64}$/.test(b.answer_id)) {
    return 'answer_id must be 1..64 letters, digits, "-" or "_"';
  }
  if (typeof b.template_id !== 'string' || b.template_id.length < 1 || b.template_id.length > 128) {
    return 'template_id must be 1..128 characters';
  }
  if (typeof b.status !== 'string' || !STATUSES.includes(b.status)) {
    return 'status must be accept, reject or off';
  }
  return null;
}

/**
 * The event for one answer of one CRM user. The event id is a hash of the
 * user and the answer id: the same report, sent again, is the same event.
 */
export function subscriptionEvent(
  user: { user_id: string; openid?: string },
  answer: SubscriptionAnswer,
  at: Date = new Date(),
): SubscriptionChangedEvent {
  const digest = createHash('sha256').update(`${user.user_id}\n${answer.answer_id}\n${answer.template_id}`).digest('hex');
  return {
    event_id: `sub-${digest.slice(0, 32)}`,
    event_type: 'subscription.changed',
    occurred_at: rfc3339(at),
    user: user.openid ? { user_id: user.user_id, openid: user.openid } : { user_id: user.user_id },
    template_id: answer.template_id,
    status: answer.status,
  };
}

@Injectable()
export class SubscriptionChangedPublisher implements OnModuleInit, OnModuleDestroy {
  private readonly channel: CrmEventsChannel;

  constructor(options: { url: string; exchange?: string }) {
    this.channel = new CrmEventsChannel(options);
  }

  async onModuleInit(): Promise<void> {
    await this.channel.open();
  }

  async onModuleDestroy(): Promise<void> {
    await this.channel.close();
  }

  /** Publishes one answer; resolves once the broker confirmed it. Throws otherwise: answer the client 5xx, it sends the report again. */
  async answered(user: { user_id: string; openid?: string }, answer: SubscriptionAnswer): Promise<SubscriptionChangedEvent> {
    const event = subscriptionEvent(user, answer);
    await this.channel.publish(SUBSCRIPTION_ROUTING_KEY, [event]);
    return event;
  }
}
