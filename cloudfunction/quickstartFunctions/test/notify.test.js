// The function as WeChat runs it (index.js's exports.main), against the fake
// wx-server-sdk in fake_modules (NODE_PATH): what it sends, what it records,
// and what it answers the service.
'use strict';

const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const path = require('node:path');

process.env.TEMPLATE_ID = 'tpl-assign';
process.env.TEMPLATE_PAGE = 'pages/customer/list?notice={notice_id}';
delete process.env.TEMPLATE_DATA;

const cloud = require('wx-server-sdk');
const { main, traceparentOf } = require('../index');

test('the fake sdk is the one loaded (run with NODE_PATH=test/fake_modules)', () => {
  assert.equal(cloud.__fake, true, 'a real wx-server-sdk in node_modules shadows the fake');
});

function notice(overrides = {}) {
  return {
    notice_id: '9f2c0000000000000000000000000000000000000000000000000000000000aa',
    assignee: { user_id: '1024', name: '张三', openid: 'oUser1024' },
    customer_count: 12,
    customers: [
      { id: '88231', name: '上海某某贸易有限公司' },
      { id: '88232', name: '北京某某科技有限公司' },
    ],
    assigned_by: { user_id: '7', name: '李经理' },
    source: 'batch',
    first_assigned_at: '2026-11-25T14:03:27+08:00',
    last_assigned_at: '2026-11-25T14:03:29+08:00',
    summary: true,
    event_ids: ['e1', 'e2'],
    ...overrides,
  };
}

const call = (n) => main({ type: 'sendCustomerAssignNotification', notice: n });

test.beforeEach(() => {
  cloud.__reset();
});

test('a notice is sent once to the assignee\'s openid, and recorded', async () => {
  const answer = await call(notice());
  assert.deepEqual(answer, { errcode: 0, errmsg: 'ok' });
  assert.equal(cloud.__state.sent.length, 1);
  const sent = cloud.__state.sent[0];
  assert.equal(sent.touser, 'oUser1024');
  assert.equal(sent.templateId, 'tpl-assign');
  assert.equal(sent.page, `pages/customer/list?notice=${notice().notice_id}`);
  assert.equal(sent.miniprogramState, 'formal');
  assert.deepEqual(sent.data, {
    thing1: { value: '上海某某贸易有限公司…' },
    number2: { value: '12' },
    name3: { value: '李经理' },
    time4: { value: '2026-11-25 14:03' },
  });
  const record = cloud.__state.collections.get('notifications').get(notice().notice_id);
  assert.equal(record.status, 'sent');
  assert.equal(record.user_id, '1024');
});

test('with the grant ledger on, the notice\'s template_id and the ledger\'s openid are what is sent', async () => {
  // The events lacked an openid; the service put the ledger's on the notice,
  // and the template the ledger counted the user's credits for.
  const n = notice({ template_id: 'tpl-ledger', assignee: { user_id: '1024', name: '张三', openid: 'oFromLedger' } });
  assert.deepEqual(await call(n), { errcode: 0, errmsg: 'ok' });
  assert.equal(cloud.__state.sent.length, 1);
  assert.equal(cloud.__state.sent[0].touser, 'oFromLedger');
  assert.equal(cloud.__state.sent[0].templateId, 'tpl-ledger', 'the notice\'s template wins over TEMPLATE_ID');
});

test('a notice that names its template needs no TEMPLATE_ID, and one that names none still does', async () => {
  const saved = process.env.TEMPLATE_ID;
  delete process.env.TEMPLATE_ID;
  try {
    assert.equal((await main({ type: 'wechatNotifierProbe', template_id: 'tpl-ledger' })).errcode, 0);
    assert.equal((await call(notice({ template_id: 'tpl-ledger' }))).errcode, 0);
    assert.equal(cloud.__state.sent[0].templateId, 'tpl-ledger');
    const without = await call(notice({ notice_id: 'another-notice' }));
    assert.equal(without.errcode, 85088);
    assert.match(without.errmsg, /TEMPLATE_ID/);
  } finally {
    process.env.TEMPLATE_ID = saved;
  }
  assert.equal((await call(notice({ notice_id: 'bad-template', template_id: '' }))).errcode, 47003);
  assert.equal(cloud.__state.sent.length, 1);
});

test('a duplicate notice_id sends nothing and answers ok', async () => {
  assert.equal((await call(notice())).errcode, 0);
  const again = await call(notice());
  assert.equal(again.errcode, 0);
  assert.match(again.errmsg, /already sent/);
  assert.equal(cloud.__state.sent.length, 1, 'one message for two deliveries');
});

test('a notice without an openid gets 40003 with a clear reason, and nothing is sent', async () => {
  // Whatever a database holds: the function reads no user table (nothing in
  // the repository writes one); the openid travels on the notice.
  cloud.__insert('users', { _id: 'u9', user_id: '9999', openid: 'oStale9999' });
  const answer = await call(notice({ assignee: { user_id: '9999', name: '王五' } }));
  assert.equal(answer.errcode, 40003);
  assert.match(answer.errmsg, /no openid for user_id 9999/);
  assert.equal(cloud.__state.sent.length, 0);
});

for (const [errCode, errMsg] of [
  [43101, 'user refuse to accept the msg'],
  [47003, 'argument invalid! data.thing1.value invalid'],
  [45009, 'reach max api daily quota limit'],
  [40003, 'invalid openid'],
]) {
  test(`WeChat's errcode ${errCode} is passed through, and a later retry may send`, async () => {
    cloud.__failNextSend(errCode, errMsg);
    assert.deepEqual(await call(notice()), { errcode: errCode, errmsg: errMsg });
    assert.equal(cloud.__state.sent.length, 0);
    assert.equal(cloud.__state.collections.get('notifications')?.size ?? 0, 0, 'not recorded as sent');
    assert.equal((await call(notice())).errcode, 0, 'the retry is not taken for a duplicate');
    assert.equal(cloud.__state.sent.length, 1);
  });
}

test('an error that is not WeChat’s makes the function fail (the service retries)', async () => {
  const send = cloud.openapi.subscribeMessage.send;
  cloud.openapi.subscribeMessage.send = async () => {
    throw new Error('socket hang up');
  };
  try {
    await assert.rejects(call(notice()), /socket hang up/);
  } finally {
    cloud.openapi.subscribeMessage.send = send;
  }
});

test('a malformed notice is rejected with 47003, and an unknown type too', async () => {
  assert.equal((await call(notice({ notice_id: '' }))).errcode, 47003);
  assert.equal((await call(notice({ customer_count: 0 }))).errcode, 47003);
  assert.equal((await main({ type: 'somethingElse' })).errcode, 47003);
  assert.equal(cloud.__state.sent.length, 0);
});

test("the service's probe is answered without sending", async () => {
  assert.deepEqual(await main({ type: 'wechatNotifierProbe' }), { errcode: 0, errmsg: 'ok' });
  assert.equal(cloud.__state.sent.length, 0);
});

test('the probe answers what a send would get for a bad setting, and sends nothing', async () => {
  const saved = { ...process.env };
  try {
    delete process.env.TEMPLATE_ID;
    const missing = await main({ type: 'wechatNotifierProbe' });
    assert.equal(missing.errcode, 85088);
    assert.equal((await call(notice())).errcode, 85088, 'a send gets the same');
    process.env.TEMPLATE_ID = 'tpl-assign';
    process.env.TEMPLATE_DATA = '{not json';
    assert.equal((await main({ type: 'wechatNotifierProbe' })).errcode, 85088);
    assert.equal((await call(notice())).errcode, 85088, 'a bad TEMPLATE_DATA is not the notice\'s fault');
    process.env.TEMPLATE_DATA = JSON.stringify({ thing1: '{no_such_placeholder}' });
    assert.equal((await main({ type: 'wechatNotifierProbe' })).errcode, 85088);
    assert.equal((await call(notice())).errcode, 85088);
  } finally {
    process.env.TEMPLATE_ID = saved.TEMPLATE_ID;
    delete process.env.TEMPLATE_DATA;
  }
  assert.equal(cloud.__state.sent.length, 0);
});

test('without the openapi permission the probe answers -604101', () => {
  const { configFault } = require('../index');
  assert.equal(configFault(process.env, { openapi: [] }).errcode, -604101);
  assert.equal(configFault(process.env, null).errcode, -604101);
  assert.equal(configFault(process.env, { openapi: ['subscribeMessage.send'] }), null);
});

test('without TEMPLATE_ID the function reports a configuration fault (85088)', async () => {
  const saved = process.env.TEMPLATE_ID;
  delete process.env.TEMPLATE_ID;
  try {
    const answer = await call(notice());
    assert.equal(answer.errcode, 85088);
    assert.match(answer.errmsg, /TEMPLATE_ID/);
  } finally {
    process.env.TEMPLATE_ID = saved;
  }
});

test('TEMPLATE_DATA replaces the mapping', async () => {
  process.env.TEMPLATE_DATA = JSON.stringify({ thing9: '{assignee}：{customer_count}位新客户' });
  try {
    assert.equal((await call(notice())).errcode, 0);
    assert.deepEqual(cloud.__state.sent[0].data, { thing9: { value: '张三：12位新客户' } });
  } finally {
    delete process.env.TEMPLATE_DATA;
  }
});

test('config.json grants subscribeMessage.send', () => {
  const config = JSON.parse(fs.readFileSync(path.join(__dirname, '..', 'config.json'), 'utf8'));
  assert.ok(config.permissions.openapi.includes('subscribeMessage.send'));
});

test("the trigger's traceparent header is logged with the notice id; a malformed one is ignored", async () => {
  const tp = '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01';
  const lines = [];
  const log = console.log;
  console.log = (line) => lines.push(line);
  try {
    const answer = await main({
      type: 'sendCustomerAssignNotification',
      notice: notice(),
      headers: { 'content-type': 'application/json', Traceparent: tp },
    });
    assert.equal(answer.errcode, 0);
  } finally {
    console.log = log;
  }
  const logged = lines.map((l) => JSON.parse(l)).find((l) => l.traceparent);
  assert.deepEqual(logged, {
    notice_id: notice().notice_id,
    traceparent: tp,
    trace_id: '4bf92f3577b34da6a3ce929d0e0e4736',
    span_id: '00f067aa0ba902b7',
  });
  assert.equal(traceparentOf({ headers: { traceparent: 'nope' } }), undefined);
  assert.equal(traceparentOf({}), undefined);
});
