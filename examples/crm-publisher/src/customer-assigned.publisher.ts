// How the CRM's NestJS back end publishes `customer.assigned` for
// wechat-notifier (contract section 1): one persistent JSON event per assigned
// customer, `message_id` = event id, on a confirm channel, `mandatory` so an
// event no queue takes is an error and not a silent loss. A bulk assignment
// (batch, public pool) gives every event the same `batch.id` and the batch's
// size, so the notifier announces it as soon as the last event arrives.
//
// Call it after the assignment is committed to the database. It resolves once
// the broker has confirmed every event; if it throws, publish the SAME events
// again (same event ids): the notifier counts a repeated event id once.
import { Injectable, OnModuleDestroy, OnModuleInit } from '@nestjs/common';
import { randomUUID } from 'node:crypto';
import { ChannelOptions, CrmEventsChannel } from './crm-events.channel';

export const ROUTING_KEY = 'customer.assigned';

/** The CRM's four assignment paths. */
export type AssignSource = 'miniprogram' | 'web' | 'batch' | 'public_pool';

export interface Staff {
  user_id: string;
  name?: string;
  /** The mini program openid, when the CRM has it (the direct mode needs it). */
  openid?: string;
}

export interface Customer {
  id: string;
  name: string;
}

/** One customer going to one member of staff. */
export interface Assignment {
  assignee: Staff;
  customer: Customer;
}

export interface CustomerAssignedEvent {
  event_id: string;
  event_type: 'customer.assigned';
  occurred_at: string;
  source: AssignSource;
  assignee: Staff;
  customer: Customer;
  assigned_by?: Staff;
  batch?: { id: string; size: number };
}

export type PublisherOptions = ChannelOptions;

/** RFC 3339 with the local offset, e.g. 2026-11-25T14:03:27+08:00. */
export function rfc3339(date: Date): string {
  const pad = (n: number) => String(Math.floor(Math.abs(n))).padStart(2, '0');
  const offset = -date.getTimezoneOffset();
  const sign = offset >= 0 ? '+' : '-';
  return (
    `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())}` +
    `T${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}` +
    `${sign}${pad(offset / 60)}:${pad(offset % 60)}`
  );
}

@Injectable()
export class CustomerAssignedPublisher implements OnModuleInit, OnModuleDestroy {
  private readonly channel: CrmEventsChannel;

  constructor(options: PublisherOptions) {
    this.channel = new CrmEventsChannel(options);
  }

  async onModuleInit(): Promise<void> {
    await this.channel.open();
  }

  async onModuleDestroy(): Promise<void> {
    await this.channel.close();
  }

  /**
   * The events for one assignment action. More than one customer (or a bulk
   * source) makes a batch: same `batch.id`, `batch.size` = the number of events.
   */
  buildEvents(source: AssignSource, assignedBy: Staff | undefined, assignments: Assignment[]): CustomerAssignedEvent[] {
    const now = rfc3339(new Date());
    const bulk = assignments.length > 1 || source === 'batch' || source === 'public_pool';
    const batch = bulk ? { id: `b-${randomUUID()}`, size: assignments.length } : undefined;
    return assignments.map(({ assignee, customer }) => ({
      event_id: randomUUID(),
      event_type: 'customer.assigned' as const,
      occurred_at: now,
      source,
      assignee,
      customer,
      ...(assignedBy ? { assigned_by: assignedBy } : {}),
      ...(batch ? { batch } : {}),
    }));
  }

  /** Builds and publishes one assignment action; resolves with its events once all are confirmed. */
  async assign(source: AssignSource, assignedBy: Staff | undefined, assignments: Assignment[]): Promise<CustomerAssignedEvent[]> {
    const events = this.buildEvents(source, assignedBy, assignments);
    await this.publish(events);
    return events;
  }

  /**
   * Publishes events and waits for the broker's confirms. Throws if any was
   * refused (nack), returned as unroutable, or the channel failed: then publish
   * the same events again.
   */
  async publish(events: CustomerAssignedEvent[]): Promise<void> {
    await this.channel.publish(ROUTING_KEY, events);
  }
}
