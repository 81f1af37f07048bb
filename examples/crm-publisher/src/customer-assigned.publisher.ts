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
import { Injectable, Logger, OnModuleDestroy, OnModuleInit } from '@nestjs/common';
import * as amqp from 'amqplib';
import { randomUUID } from 'node:crypto';

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

export interface PublisherOptions {
  /** e.g. amqp://crm:secret@rabbitmq:5672/%2f */
  url: string;
  /** `crm.events` unless the notifier's NOTIFIER_EXCHANGE says otherwise. */
  exchange?: string;
}

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
  private readonly logger = new Logger(CustomerAssignedPublisher.name);
  private readonly exchange: string;
  private connection?: amqp.ChannelModel;
  private channel?: amqp.ConfirmChannel;
  /** message ids the broker returned as unroutable since they were published. */
  private readonly returned = new Set<string>();

  constructor(private readonly options: PublisherOptions) {
    this.exchange = options.exchange ?? 'crm.events';
  }

  async onModuleInit(): Promise<void> {
    await this.open();
  }

  async onModuleDestroy(): Promise<void> {
    await this.channel?.close().catch(() => undefined);
    await this.connection?.close().catch(() => undefined);
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
    const channel = await this.open();
    const confirms = events.map(async (event) => {
      const confirmed = new Promise<void>((resolve, reject) => {
        const written = channel.publish(
          this.exchange,
          ROUTING_KEY,
          Buffer.from(JSON.stringify(event), 'utf8'),
          {
            persistent: true,
            mandatory: true,
            contentType: 'application/json',
            contentEncoding: 'utf-8',
            messageId: event.event_id,
            timestamp: Math.floor(Date.now() / 1000),
            appId: 'crm',
          },
          (err) => (err ? reject(new Error(`event ${event.event_id} was not confirmed: ${err}`)) : resolve()),
        );
        if (!written) {
          // The socket buffer is full: the confirm still comes; nothing to redo.
          this.logger.debug('publish buffer full, waiting for the broker');
        }
      });
      await confirmed;
      // A return arrives before its confirm, so by now it has been seen.
      if (this.returned.delete(event.event_id)) {
        throw new Error(`event ${event.event_id} was unroutable: is wechat-notifier's queue declared and bound?`);
      }
    });
    const results = await Promise.allSettled(confirms);
    const failed = results.filter((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed.length > 0) {
      throw new Error(`${failed.length} of ${events.length} events not published: ${failed[0].reason}`);
    }
  }

  /** The confirm channel, (re)opened when needed; declares the exchange so either side may start first. */
  private async open(): Promise<amqp.ConfirmChannel> {
    if (this.channel) return this.channel;
    const connection = await amqp.connect(this.options.url);
    connection.on('error', (err) => this.logger.warn(`RabbitMQ connection error: ${err.message}`));
    connection.on('close', () => {
      this.connection = undefined;
      this.channel = undefined;
    });
    const channel = await connection.createConfirmChannel();
    channel.on('error', (err) => this.logger.warn(`RabbitMQ channel error: ${err.message}`));
    channel.on('close', () => {
      this.channel = undefined;
    });
    channel.on('return', (msg: amqp.Message) => {
      const id = msg.properties.messageId;
      if (typeof id === 'string') this.returned.add(id);
    });
    await channel.assertExchange(this.exchange, 'topic', { durable: true });
    this.connection = connection;
    this.channel = channel;
    return channel;
  }
}
