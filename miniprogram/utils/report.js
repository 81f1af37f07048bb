// Reporting each answer of the subscription dialog to the CRM, which turns it
// into one `subscription.changed` event for wechat-notifier's grant ledger
// (docs/crm-integration.md, section 4). The ledger counts an accept as one
// more message the service may send this user, so a lost report means a
// notice that waits for nothing. Reports are therefore kept until the CRM
// took them, and sent again (on the page's next show) with the same
// `answer_id`, from which the CRM derives the event id: a report sent twice
// counts once.
//
// What is posted, `POST {crmBaseUrl}/wechat/subscriptions`:
//   { answer_id, template_id, status: 'accept' | 'reject' | 'off', result }
// `status` is the ledger's word; `result` the page's finer state, for the
// CRM's own records. The openid is not posted: the CRM has it from the login
// binding (utils/crm.js), tied to the CRM session that signs the request.
'use strict';

const { request } = require('./crm');

const PENDING_KEY = 'pendingSubscriptionReports';

/**
 * The ledger's status for a state of utils/subscribe.js, or null for a state
 * that is no answer of the user's (nothing to report).
 */
function statusOf(state) {
  switch (state) {
    case 'accepted':
      return 'accept'; // one more message
    case 'rejected':
    case 'banned':
    case 'filtered':
      return 'reject'; // no change: no credit given, none taken
    case 'always_rejected':
    case 'switched_off':
      // The settings now refuse this template (or every one): WeChat sends
      // nothing, whatever was accepted before.
      return 'off';
    default:
      return null;
  }
}

/** A fresh id for one answer; unique per user, which is all the CRM needs. */
function newAnswerId() {
  return `a-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 10)}`;
}

function pending(wx) {
  const list = wx.getStorageSync(PENDING_KEY);
  return Array.isArray(list) ? list : [];
}

/**
 * Sends every report not yet taken by the CRM, oldest first; stops at the
 * first failure (the rest wait for the next try). Resolves with how many
 * are still waiting.
 */
async function flushReports(wx) {
  let waiting = pending(wx);
  while (waiting.length > 0) {
    try {
      await request(wx, { path: '/wechat/subscriptions', method: 'POST', data: waiting[0] });
    } catch (err) {
      break;
    }
    waiting = pending(wx).filter((r) => r.answer_id !== waiting[0].answer_id);
    wx.setStorageSync(PENDING_KEY, waiting);
  }
  return waiting.length;
}

/**
 * Records one answer of the dialog and sends it (with any earlier ones that
 * failed). Resolves with the report, or null when the state is no answer.
 */
async function reportAnswer(wx, templateId, state) {
  const status = statusOf(state);
  if (!status) return null;
  const report = { answer_id: newAnswerId(), template_id: templateId, status, result: state };
  wx.setStorageSync(PENDING_KEY, [...pending(wx), report]);
  await flushReports(wx);
  return report;
}

module.exports = { reportAnswer, flushReports, statusOf, PENDING_KEY };
