// A runnable use of CustomerAssignedPublisher, as the CRM's bulk-assignment
// endpoint would use it: N customers over M members of staff, in one batch.
//
//   npm ci && npm run build
//   AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f node dist/main.js --customers 50 --assignees 3
//
// Prints one JSON line: {"batch_id": …, "event_ids": [...]}. Exits 1 if any
// event was not confirmed.
import { Assignment, AssignSource, CustomerAssignedPublisher } from './customer-assigned.publisher';

function arg(name: string, fallback: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && process.argv[i + 1] !== undefined ? process.argv[i + 1] : fallback;
}

const STAFF = ['张伟', '王芳', '李娜', '刘洋', '陈静', '杨磊'];
const CITIES = ['上海', '北京', '深圳', '杭州', '成都'];
const TRADES = ['贸易', '科技', '物流', '餐饮', '供应链管理'];

async function main(): Promise<void> {
  const customers = Number(arg('customers', '10'));
  const assignees = Number(arg('assignees', '2'));
  const source = arg('source', 'batch') as AssignSource;
  const userPrefix = arg('user-prefix', 'crm-');
  const publisher = new CustomerAssignedPublisher({
    url: process.env.AMQP_URL ?? 'amqp://guest:guest@127.0.0.1:5672/%2f',
    exchange: process.env.CRM_EXCHANGE ?? 'crm.events',
  });
  await publisher.onModuleInit();
  try {
    const assignments: Assignment[] = Array.from({ length: customers }, (_, i) => {
      const a = i % assignees;
      return {
        assignee: { user_id: `${userPrefix}${a}`, name: STAFF[a % STAFF.length], openid: `oCrm${userPrefix}${a}` },
        customer: {
          id: String(990000 + i),
          name: `${CITIES[i % CITIES.length]}${TRADES[i % TRADES.length]}第${i + 1}有限公司`,
        },
      };
    });
    const events = await publisher.assign(source, { user_id: '7', name: '李经理' }, assignments);
    console.log(JSON.stringify({ batch_id: events[0]?.batch?.id ?? null, event_ids: events.map((e) => e.event_id) }));
  } finally {
    await publisher.onModuleDestroy();
  }
}

main().catch((err) => {
  console.error(`publish failed: ${err instanceof Error ? err.message : err}`);
  process.exit(1);
});
