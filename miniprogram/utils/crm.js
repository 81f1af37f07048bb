// The CRM back end, as the mini program talks to it, and the login flow that
// tells the CRM which openid belongs to the signed-in salesperson:
//
//   wx.login() -> a one-time code (valid 5 minutes)
//   POST {crmBaseUrl}/wechat/session { code }   (with the CRM session token)
//   the CRM back end calls code2Session with its AppSecret, stores the openid
//   with the CRM user, and never sends the session_key back.
//
// Events then carry `assignee.openid`, which both delivery modes use, and the
// CRM puts it on the subscription events it publishes for the grant ledger.
'use strict';

const config = require('../config');
const { call } = require('./wxp');

const TOKEN_KEY = 'crmToken';

/** A CRM API call; resolves with the body of a 2xx answer, rejects otherwise. */
async function request(wx, { path, method = 'GET', data }) {
  const token = wx.getStorageSync(TOKEN_KEY);
  const res = await call(wx, 'request', {
    url: `${config.crmBaseUrl}${path}`,
    method,
    data,
    header: token ? { Authorization: `Bearer ${token}` } : {},
  });
  if (res.statusCode < 200 || res.statusCode >= 300) {
    const reason = (res.data && res.data.message) || `HTTP ${res.statusCode}`;
    throw new Error(`CRM ${method} ${path}: ${reason}`);
  }
  return res.data;
}

/**
 * Binds this WeChat user to the signed-in CRM user (needs the CRM token).
 * Resolves with the CRM's answer ({ bound: true }).
 */
async function bindWechat(wx) {
  if (!wx.getStorageSync(TOKEN_KEY)) throw new Error('sign in to the CRM first');
  let login;
  try {
    login = await call(wx, 'login', { timeout: 10000 });
  } catch (err) {
    throw new Error(`wx.login failed: ${err.errMsg || err}`);
  }
  return request(wx, { path: '/wechat/session', method: 'POST', data: { code: login.code } });
}

module.exports = { request, bindWechat, TOKEN_KEY };
