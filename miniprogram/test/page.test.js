// pages/customer/list.js as WeChat runs it: Page() registers the definition,
// the framework calls onLoad/onShow, and a tap calls onAskNotices.
'use strict';

const test = require('node:test');
const assert = require('node:assert/strict');
const path = require('node:path');
const config = require('../config');
const { fakeWx, tap } = require('./fake-wx');
const { TOKEN_KEY } = require('../utils/crm');
const { PENDING_KEY } = require('../utils/report');

const T = config.templateId;
const PAGE = path.join(__dirname, '../pages/customer/list.js');

/** Loads the page with `wx` and `Page` as globals; returns an instance. */
function open(script) {
  const wx = fakeWx({ storage: { [TOKEN_KEY]: 'crm-session-1' }, crmBase: config.crmBaseUrl, ...script });
  let definition;
  global.wx = wx;
  global.Page = (d) => {
    definition = d;
  };
  delete require.cache[PAGE];
  require(PAGE);
  const page = Object.create(definition);
  page.data = JSON.parse(JSON.stringify(definition.data));
  page.setData = (patch) => Object.assign(page.data, patch);
  return { wx, page };
}

const customers = {
  'GET /customers/assigned': {
    statusCode: 200,
    data: { customers: [{ id: '88231', name: '上海某某贸易有限公司' }] },
  },
};

test('the page a notice opens shows that notice\'s customers, without asking', async () => {
  const { wx, page } = open({ crm: customers });
  await page.onLoad({ notice: '9f2c' });
  await page.onShow();
  assert.deepEqual(page.data.customers, [{ id: '88231', name: '上海某某贸易有限公司' }]);
  assert.equal(page.data.loading, false);
  assert.equal(wx.called('request')[0].url, `${config.crmBaseUrl}/customers/assigned?notice=9f2c`);
  assert.equal(wx.called('requestSubscribeMessage').length, 0, 'no dialog without a tap');
  assert.equal(page.data.subscription, 'ask');
});

test('a tap asks for the configured template; an accept is reported to the CRM', async () => {
  const { wx, page } = open({
    answers: { [T]: 'accept' },
    crm: { ...customers, 'POST /wechat/subscriptions': { statusCode: 204, data: '' } },
  });
  assert.equal(await tap(wx, () => page.onAskNotices()), 'accepted');
  assert.deepEqual(wx.called('requestSubscribeMessage')[0].tmplIds, [T]);
  assert.equal(page.data.subscription, 'accepted');
  assert.equal(wx.called('showToast')[0].title, '下次分配会通知你');
  // What the CRM's handler needs to publish subscription.changed: the
  // template, the ledger's status, and an id that makes a resent report
  // count once. The openid is the CRM session's, not posted.
  const reports = wx.called('request').filter((r) => r.url.endsWith('/wechat/subscriptions'));
  assert.equal(reports.length, 1);
  const { answer_id: answerId, ...rest } = reports[0].data;
  assert.deepEqual(rest, { template_id: T, status: 'accept', result: 'accepted' });
  assert.match(answerId, /^[A-Za-z0-9-]{8,64}$/);
  assert.deepEqual(wx.getStorageSync(PENDING_KEY), [], 'nothing left to send');
});

test('a report the CRM did not take is sent again, with the same answer id, on the next show', async () => {
  const { wx, page } = open({
    answers: { [T]: 'accept' },
    crm: { ...customers, 'POST /wechat/subscriptions': { statusCode: 503, data: '' } },
  });
  assert.equal(await tap(wx, () => page.onAskNotices()), 'accepted');
  const first = wx.called('request').filter((r) => r.url.endsWith('/wechat/subscriptions'));
  assert.equal(first.length, 1);
  assert.equal(wx.getStorageSync(PENDING_KEY).length, 1, 'kept');

  wx.__state.crm['POST /wechat/subscriptions'] = { statusCode: 204, data: '' };
  await page.onShow();
  const all = wx.called('request').filter((r) => r.url.endsWith('/wechat/subscriptions'));
  assert.equal(all.length, 2);
  assert.deepEqual(all[1].data, first[0].data, 'the same report, the same answer id');
  assert.deepEqual(wx.getStorageSync(PENDING_KEY), []);
  await page.onShow();
  assert.equal(
    wx.called('request').filter((r) => r.url.endsWith('/wechat/subscriptions')).length,
    2,
    'sent once it was taken, never again',
  );
});

test('"always reject" and a switched-off main switch are reported as off', async () => {
  for (const subscriptions of [
    { mainSwitch: true, itemSettings: { [T]: 'reject' } },
    { mainSwitch: false, itemSettings: {} },
  ]) {
    const { wx, page } = open({
      subscriptions,
      modalConfirms: false,
      crm: { 'POST /wechat/subscriptions': { statusCode: 204, data: '' } },
    });
    await tap(wx, () => page.onAskNotices());
    const report = wx.called('request').find((r) => r.url.endsWith('/wechat/subscriptions'));
    assert.equal(report.data.status, 'off', JSON.stringify(subscriptions));
  }
});

test('a dialog that failed is no answer: nothing is reported', async () => {
  const { wx, page } = open({ answers: {} });
  // Outside a tap WeChat refuses to show the dialog at all.
  assert.equal(await page.onAskNotices(), 'error');
  assert.equal(wx.called('request').filter((r) => r.url.endsWith('/wechat/subscriptions')).length, 0);
});

test('the page says how many assignments wait for an accept', async () => {
  const { page } = open({
    crm: { 'GET /customers/assigned': { statusCode: 200, data: { customers: [], notices_waiting: 3 } } },
  });
  await page.onLoad({});
  assert.equal(page.data.waiting, 3);
});

test('a plain rejection says so and stays askable', async () => {
  const { wx, page } = open({ answers: { [T]: 'reject' } });
  assert.equal(await tap(wx, () => page.onAskNotices()), 'rejected');
  assert.equal(wx.called('showModal').length, 0);
  assert.equal(wx.called('showToast')[0].title, '不会收到分配通知');
});

test('"always reject" guides the user to the settings page', async () => {
  const { wx, page } = open({ subscriptions: { mainSwitch: true, itemSettings: { [T]: 'reject' } } });
  await page.onShow();
  assert.equal(page.data.subscription, 'always_rejected', 'the settings button shows at once');
  assert.equal(await tap(wx, () => page.onAskNotices()), 'always_rejected');
  assert.equal(wx.called('showModal').length, 1);
  assert.deepEqual(wx.called('openSetting').map((o) => o.withSubscriptions), [true]);
  assert.equal(wx.__state.settingsOpened, 1, 'the settings page opened');
});

test('back from the settings with the subscription on, the page can ask again', async () => {
  const { wx, page } = open({ subscriptions: { mainSwitch: false, itemSettings: {} } });
  await page.onShow();
  assert.equal(page.data.subscription, 'switched_off');
  assert.equal(await tap(wx, () => page.onOpenSettings()), true);
  wx.__state.subscriptions = { mainSwitch: true, itemSettings: {} }; // the user switched it on
  await page.onShow();
  assert.equal(page.data.subscription, 'ask');
});

test('a CRM that cannot list the customers shows an error, not an empty list', async () => {
  const { page } = open({ crm: { 'GET /customers/assigned': { statusCode: 502, data: '' } } });
  await page.onLoad({});
  assert.equal(page.data.loading, false);
  assert.match(page.data.error, /HTTP 502/);
});
