// The CRM's side of the `crm.events` exchange, shared by its publishers: one
// confirm channel, opened again when it died, that publishes persistent JSON
// events (`message_id` = `event_id`, `mandatory`) and resolves only when the
// broker confirmed every one and returned none as unroutable.
import { Logger } from '@nestjs/common';
import * as amqp from 'amqplib';

export interface ChannelOptions {
  /** e.g. amqp://crm:secret@rabbitmq:5672/%2f */
  url: string;
  /** `crm.events` unless the notifier's NOTIFIER_EXCHANGE says otherwise. */
  exchange?: string;
}

export class CrmEventsChannel {
  private readonly logger = new Logger(CrmEventsChannel.name);
  readonly exchange: string;
  private connection?: amqp.ChannelModel;
  private channel?: amqp.ConfirmChannel;
  /** message ids the broker returned as unroutable since they were published. */
  private readonly returned = new Set<string>();

  constructor(private readonly options: ChannelOptions) {
    this.exchange = options.exchange ?? 'crm.events';
  }

  /**
   * Publishes events under `routingKey` and waits for the broker's confirms.
   * Throws if any was refused (nack), returned as unroutable, or the channel
   * failed: then publish the same events again.
   */
  async publish(routingKey: string, events: { event_id: string }[]): Promise<void> {
    const channel = await this.open();
    const confirms = events.map(async (event) => {
      const confirmed = new Promise<void>((resolve, reject) => {
        const written = channel.publish(
          this.exchange,
          routingKey,
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
  async open(): Promise<amqp.ConfirmChannel> {
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

  async close(): Promise<void> {
    await this.channel?.close().catch(() => undefined);
    await this.connection?.close().catch(() => undefined);
  }
}
