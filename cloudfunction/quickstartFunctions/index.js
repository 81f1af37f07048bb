// quickstartFunctions: the receiving side of wechat-notifier. The service calls
// it over HTTP (`tcb/invokecloudfunction`) with
//   { type: "sendCustomerAssignNotification", notice: { … } }
// and it sends the assignee one subscribe message, answering
//   { errcode, errmsg }
// with WeChat's own errcode passed through (43101 and friends), so the service
// can ack, retry or dead-letter correctly (contract section 4).
//
// - A notice already sent (same notice_id in the `notifications` collection) is
//   not sent again: the service delivers at least once.
// - An HTTP-triggered function has no caller openid: the message goes to
//   `notice.assignee.openid`, which the CRM puts on its events (bound at the
//   mini program's login) and which, with the grant ledger on, the service
//   fills from the ledger when the events lack it. A notice without one is
//   answered 40003; the function keeps no user -> openid table of its own.
// - With the grant ledger on, the notice carries `template_id`: the template
//   the ledger counted the user's credits for, so it is the one sent.
// - Settings are the function's environment variables: TEMPLATE_ID (required
//   unless every notice carries template_id), TEMPLATE_PAGE, MINIPROGRAM_STATE
//   (formal), LANG_CODE (zh_CN) and TEMPLATE_DATA (the keyword mapping as JSON;
//   defaults to the contract's example).
'use strict';

const cloud = require('wx-server-sdk');
const { buildData, render, DEFAULT_DATA } = require('./template');

cloud.init({ env: cloud.DYNAMIC_CURRENT_ENV });

const NOTIFICATIONS = 'notifications';

// Errcodes this function answers itself (WeChat's own meanings).
const INVALID_OPENID = 40003; // no openid for the assignee: rejected, dead-lettered by the service
const INVALID_ARGUMENT = 47003; // a malformed notice or template: rejected
const CONFIG_FAULT = 85088; // the function is not configured: the service holds and reports it
const NO_PERMISSION = -604101; // config.json does not grant openapi subscribeMessage.send

// A notice the probe renders TEMPLATE_DATA with, as a real send would.
const PROBE_NOTICE = {
  notice_id: 'probe',
  assignee: { user_id: 'probe', name: '探测' },
  customer_count: 1,
  customers: [{ id: 'probe', name: '探测客户' }],
  assigned_by: { user_id: 'probe', name: '探测' },
  source: 'web',
  first_assigned_at: '2026-01-01T00:00:00+08:00',
  last_assigned_at: '2026-01-01T00:00:00+08:00',
  summary: false,
  event_ids: ['probe'],
};

// `templateId`: the notice's own template (the grant ledger's key), which wins
// over TEMPLATE_ID.
function settings(env, templateId) {
  let data = DEFAULT_DATA;
  if (env.TEMPLATE_DATA) data = JSON.parse(env.TEMPLATE_DATA); // throws on bad JSON: see configFault
  return {
    templateId: templateId || env.TEMPLATE_ID || '',
    page: env.TEMPLATE_PAGE || '',
    miniprogramState: env.MINIPROGRAM_STATE || 'formal',
    lang: env.LANG_CODE || 'zh_CN',
    data,
  };
}

function reply(errcode, errmsg) {
  return { errcode, errmsg };
}

// What is wrong with this function's own settings, as the errcode a send would
// get, or null. A bad setting is a configuration fault, never the notice's
// fault: the service holds its messages instead of dead-lettering them.
// `templateId` is the one the notice (or the probe) names, if any.
function configFault(env, permissions, templateId) {
  const granted = (permissions && permissions.openapi) || [];
  if (!granted.includes('subscribeMessage.send')) {
    return reply(NO_PERMISSION, 'config.json does not grant openapi subscribeMessage.send');
  }
  let conf;
  try {
    conf = settings(env, templateId);
  } catch (err) {
    return reply(CONFIG_FAULT, `TEMPLATE_DATA is not valid JSON: ${err.message}`);
  }
  if (!conf.templateId) {
    return reply(CONFIG_FAULT, 'TEMPLATE_ID is not set for this function, and the notice names no template_id');
  }
  try {
    buildData(conf.data, PROBE_NOTICE);
  } catch (err) {
    return reply(CONFIG_FAULT, `TEMPLATE_DATA: ${err.message}`);
  }
  return null;
}

function permissions() {
  try {
    return require('./config.json').permissions;
  } catch (err) {
    return null;
  }
}

function checkNotice(notice) {
  if (!notice || typeof notice !== 'object') return 'the event has no notice';
  if (typeof notice.notice_id !== 'string' || notice.notice_id === '') return 'notice.notice_id is missing';
  if (!notice.assignee || notice.assignee.user_id == null || notice.assignee.user_id === '') {
    return 'notice.assignee.user_id is missing';
  }
  if (!Number.isInteger(notice.customer_count) || notice.customer_count < 1) {
    return 'notice.customer_count must be a positive integer';
  }
  if (notice.template_id != null && (typeof notice.template_id !== 'string' || notice.template_id === '')) {
    return 'notice.template_id, when present, must be a non-empty string';
  }
  return null;
}

async function alreadySent(db, noticeId) {
  try {
    const { data } = await db.collection(NOTIFICATIONS).doc(noticeId).get();
    return Boolean(data && data.status === 'sent');
  } catch (err) {
    // The database answers "document does not exist" by throwing.
    if (/not exist|not found/i.test(String(err && (err.errMsg || err.message)))) return false;
    throw err;
  }
}

// W3C trace context: an HTTP trigger hands the function its request's headers
// in `event.headers`, and the service's call carries `traceparent` (naming
// its WeChat-call span). Logged with the notice id, so the function's log line
// leads to the assignment's trace. Only a well-formed value is used.
const TRACEPARENT = /^[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$/;

function traceparentOf(event) {
  const headers = (event && event.headers) || {};
  for (const [name, value] of Object.entries(headers)) {
    if (name.toLowerCase() === 'traceparent' && typeof value === 'string') {
      const v = value.trim();
      return TRACEPARENT.test(v) ? v : undefined;
    }
  }
  return undefined;
}

async function sendCustomerAssignNotification(event) {
  const notice = event.notice;
  const problem = checkNotice(notice);
  if (problem) return reply(INVALID_ARGUMENT, problem);
  const traceparent = traceparentOf(event);
  if (traceparent) {
    const [, traceId, spanId] = TRACEPARENT.exec(traceparent);
    console.log(JSON.stringify({ notice_id: notice.notice_id, traceparent, trace_id: traceId, span_id: spanId }));
  }

  const fault = configFault(process.env, permissions(), notice.template_id);
  if (fault) return fault;
  const conf = settings(process.env, notice.template_id);

  const db = cloud.database();
  if (await alreadySent(db, notice.notice_id)) {
    return reply(0, `ok: notice ${notice.notice_id} was already sent, not sent again`);
  }

  const openid = notice.assignee.openid;
  if (typeof openid !== 'string' || openid === '') {
    return reply(
      INVALID_OPENID,
      `no openid for user_id ${notice.assignee.user_id}: the CRM's events carry no assignee.openid ` +
        '(the user has not opened the mini program since the login binding) and the grant ledger knows none',
    );
  }

  const data = buildData(conf.data, notice); // the mapping was checked by configFault

  const message = {
    touser: openid,
    templateId: conf.templateId,
    miniprogramState: conf.miniprogramState,
    lang: conf.lang,
    data,
  };
  if (conf.page) message.page = render(conf.page, notice, null);

  try {
    await cloud.openapi.subscribeMessage.send(message);
  } catch (err) {
    // wx-server-sdk throws WeChat's refusal with errCode/errMsg: pass it through.
    if (err && Number.isInteger(err.errCode)) return reply(err.errCode, String(err.errMsg || ''));
    throw err; // anything else: the function fails, and the service retries (-504002)
  }

  try {
    await db.collection(NOTIFICATIONS).doc(notice.notice_id).set({
      data: {
        status: 'sent',
        user_id: String(notice.assignee.user_id),
        customer_count: notice.customer_count,
        event_count: (notice.event_ids || []).length,
        sent_at: db.serverDate(),
      },
    });
  } catch (err) {
    // The message went out; failing now would make the service send it again.
    console.error(`notice ${notice.notice_id} sent, but not recorded: ${err && err.message}`);
  }
  return reply(0, 'ok');
}

exports.main = async (event) => {
  switch (event && event.type) {
    case 'sendCustomerAssignNotification':
      return sendCustomerAssignNotification(event);
    case 'wechatNotifierProbe':
      // The service's start-up check: the errcode a send would get for this
      // function's own settings, without sending anything.
      // It may name the template (`template_id`, the service's WECHAT_TEMPLATE_ID).
      return configFault(process.env, permissions(), event.template_id) || reply(0, 'ok');
    default:
      return reply(INVALID_ARGUMENT, `unknown type ${JSON.stringify(event && event.type)}`);
  }
};

// For the tests: the settings check with the permissions given.
exports.configFault = configFault;
exports.traceparentOf = traceparentOf;
