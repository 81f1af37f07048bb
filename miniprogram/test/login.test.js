// utils/crm.js against the fake wx: the login code goes to the CRM back end
// (which calls code2Session), with the CRM session, and nothing else does.
'use strict';

const test = require('node:test');
const assert = require('node:assert/strict');
const config = require('../config');
const { fakeWx } = require('./fake-wx');
const { bindWechat, request, TOKEN_KEY } = require('../utils/crm');

const signedIn = (crm) =>
  fakeWx({ storage: { [TOKEN_KEY]: 'crm-session-1' }, crm, crmBase: config.crmBaseUrl });

test('wx.login\'s code is posted to the CRM with the CRM session', async () => {
  const wx = signedIn({ 'POST /wechat/session': { statusCode: 200, data: { bound: true } } });
  assert.deepEqual(await bindWechat(wx), { bound: true });
  const [login] = wx.called('login');
  const [req] = wx.called('request');
  assert.ok(login);
  assert.equal(req.url, `${config.crmBaseUrl}/wechat/session`);
  assert.equal(req.method, 'POST');
  assert.match(req.data.code, /^code-/);
  assert.equal(req.header.Authorization, 'Bearer crm-session-1');
  assert.deepEqual(Object.keys(req.data), ['code'], 'only the code: no appid or secret on the phone');
});

test('a refused code (code2Session failed on the CRM) is an error, not a binding', async () => {
  const wx = signedIn({
    'POST /wechat/session': { statusCode: 400, data: { message: 'code2Session: 40029 invalid code' } },
  });
  await assert.rejects(bindWechat(wx), /40029 invalid code/);
});

test('without a CRM session nothing is asked of WeChat or the CRM', async () => {
  const wx = fakeWx({ crmBase: config.crmBaseUrl });
  await assert.rejects(bindWechat(wx), /sign in to the CRM first/);
  assert.equal(wx.__state.calls.length, 0);
});

test('a failed wx.login stops before the CRM', async () => {
  const wx = fakeWx({ storage: { [TOKEN_KEY]: 't' }, loginFails: true, crmBase: config.crmBaseUrl });
  await assert.rejects(bindWechat(wx), /wx.login failed: login:fail network error/);
  assert.equal(wx.called('request').length, 0);
});

test('a CRM answer outside 2xx rejects with the method, path and status', async () => {
  const wx = signedIn({ 'GET /customers/assigned': { statusCode: 503, data: '' } });
  await assert.rejects(request(wx, { path: '/customers/assigned' }), /CRM GET \/customers\/assigned: HTTP 503/);
});

test('the mini program holds no secret', () => {
  const text = JSON.stringify(config).toLowerCase();
  assert.doesNotMatch(text, /secret|session_key/);
});
