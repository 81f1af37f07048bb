// utils/subscribe.js against the fake wx: every answer the subscription
// dialog can give, and the way back to the settings page.
'use strict';

const test = require('node:test');
const assert = require('node:assert/strict');
const { fakeWx, tap } = require('./fake-wx');
const { askForNotices, guideToSettings, subscriptionState } = require('../utils/subscribe');

const T = 'tpl-assigned';

test('an accepted request asks for exactly the configured template', async () => {
  const wx = fakeWx({ answers: { [T]: 'accept' } });
  assert.deepEqual(await tap(wx, () => askForNotices(wx, T)), { state: 'accepted' });
  assert.deepEqual(wx.called('requestSubscribeMessage')[0].tmplIds, [T]);
});

test('a plain rejection can be asked again later: no settings detour', async () => {
  const wx = fakeWx({ answers: { [T]: 'reject' } });
  assert.deepEqual(await tap(wx, () => askForNotices(wx, T)), { state: 'rejected' });
});

test('"always reject" is told apart from a plain rejection by the settings', async () => {
  const wx = fakeWx({ subscriptions: { mainSwitch: true, itemSettings: { [T]: 'reject' } } });
  assert.deepEqual(await tap(wx, () => askForNotices(wx, T)), { state: 'always_rejected' });
  assert.equal(wx.called('getSetting')[0].withSubscriptions, true);
});

test('the main switch off (errCode 20004) is reported as switched off', async () => {
  const wx = fakeWx({ subscriptions: { mainSwitch: false, itemSettings: {} } });
  assert.deepEqual(await tap(wx, () => askForNotices(wx, T)), { state: 'switched_off' });
});

test('a template banned by the platform is not mistaken for a user choice', async () => {
  const wx = fakeWx({ answers: { [T]: 'ban' } });
  assert.deepEqual(await tap(wx, () => askForNotices(wx, T)), { state: 'banned' });
});

test('asking outside a tap fails as WeChat fails it', async () => {
  const wx = fakeWx({ answers: { [T]: 'accept' } });
  const result = await askForNotices(wx, T);
  assert.equal(result.state, 'error');
  assert.match(result.errMsg, /TAP gesture/);
});

test('the settings tell what a visit would find, without a dialog', async () => {
  const states = [
    [{ mainSwitch: true, itemSettings: {} }, 'ask'],
    [{ mainSwitch: true, itemSettings: { [T]: 'accept' } }, 'always_accepted'],
    [{ mainSwitch: true, itemSettings: { [T]: 'reject' } }, 'always_rejected'],
    [{ mainSwitch: false, itemSettings: { [T]: 'accept' } }, 'switched_off'],
  ];
  for (const [subscriptions, want] of states) {
    const wx = fakeWx({ subscriptions });
    assert.equal(await subscriptionState(wx, T), want, JSON.stringify(subscriptions));
    assert.equal(wx.called('requestSubscribeMessage').length, 0);
  }
});

test('the guide opens the settings page from the confirmed modal', async () => {
  const wx = fakeWx({ modalConfirms: true });
  assert.equal(await guideToSettings(wx), true);
  assert.equal(wx.called('showModal').length, 1);
  assert.deepEqual(
    wx.called('openSetting').map((o) => o.withSubscriptions),
    [true],
  );
  assert.equal(wx.__state.settingsOpened, 1);
});

test('a cancelled guide leaves the settings closed', async () => {
  const wx = fakeWx({ modalConfirms: false });
  assert.equal(await guideToSettings(wx), false);
  assert.equal(wx.called('openSetting').length, 0);
  assert.equal(wx.__state.settingsOpened, 0);
});
