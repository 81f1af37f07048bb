// A runnable use of SubscriptionChangedPublisher, as the CRM's
// `POST /wechat/subscriptions` handler publishes a dialog answer:
//
//   npm ci && npm run build
//   AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f node dist/accept.js \
//     --user-id 1024 --openid oW1bX5Abc --template Xb1… [--status accept] [--answer-id a-1]
//
// Prints the event as one JSON line. Exits 1 if it was not confirmed (with the
// ledger off, nothing is bound to subscription.changed: "unroutable"), 2 for
// an answer the handler would refuse.
import { answerProblem, SubscriptionAnswer, SubscriptionChangedPublisher } from './subscription-changed.publisher';

function arg(name: string, fallback?: string): string | undefined {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && process.argv[i + 1] !== undefined ? process.argv[i + 1] : fallback;
}

async function main(): Promise<void> {
  const userId = arg('user-id');
  if (!userId) {
    console.error('--user-id is required');
    process.exit(2);
  }
  const answer = {
    answer_id: arg('answer-id', `a-${Date.now().toString(36)}`),
    template_id: arg('template', 'Xb1xCustomerAssignedTemplateId0000000000000'),
    status: arg('status', 'accept'),
  };
  const problem = answerProblem(answer);
  if (problem) {
    console.error(problem);
    process.exit(2);
  }
  const publisher = new SubscriptionChangedPublisher({
    url: process.env.AMQP_URL ?? 'amqp://guest:guest@127.0.0.1:5672/%2f',
    exchange: process.env.CRM_EXCHANGE ?? 'crm.events',
  });
  await publisher.onModuleInit();
  try {
    const openid = arg('openid');
    const event = await publisher.answered({ user_id: userId, ...(openid ? { openid } : {}) }, answer as SubscriptionAnswer);
    console.log(JSON.stringify(event));
  } finally {
    await publisher.onModuleDestroy();
  }
}

main().catch((err) => {
  console.error(`publish failed: ${err instanceof Error ? err.message : err}`);
  process.exit(1);
});
