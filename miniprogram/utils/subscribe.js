// Asking the salesperson for a one-time subscription, and reading what they
// answered. One accepted request lets WeChat deliver one message, so the
// page asks again on every visit (see docs/crm-integration.md, "The
// authorisation economy").
//
// What wx.requestSubscribeMessage can come back with, as a state:
//   accepted        the user allowed one more message
//   rejected        declined this time; asking again later is fine
//   always_rejected declined with "always keep this choice": WeChat shows no
//                   dialog any more, only the settings page can undo it
//   switched_off    the subscription main switch is off (fail, errCode 20004)
//   banned          the template was banned by the platform ('ban')
//   filtered        the template was filtered (duplicate title, 'filter')
//   error           anything else (errCode kept)
'use strict';

const { call } = require('./wxp');

const MAIN_SWITCH_OFF = 20004;

/** What the settings page says about this template (no dialog is shown). */
async function subscriptionState(wx, templateId) {
  const setting = await call(wx, 'getSetting', { withSubscriptions: true });
  const subs = setting.subscriptionsSetting || {};
  if (subs.mainSwitch === false) return 'switched_off';
  const item = (subs.itemSettings || {})[templateId];
  if (item === 'reject') return 'always_rejected';
  if (item === 'accept') return 'always_accepted';
  if (item === 'ban') return 'banned';
  return 'ask';
}

/**
 * Asks for one more message of `templateId`. Must run inside a tap handler:
 * WeChat refuses to show the dialog otherwise.
 */
async function askForNotices(wx, templateId) {
  let res;
  try {
    res = await call(wx, 'requestSubscribeMessage', { tmplIds: [templateId] });
  } catch (err) {
    if (err.errCode === MAIN_SWITCH_OFF) return { state: 'switched_off' };
    return { state: 'error', errCode: err.errCode, errMsg: err.errMsg };
  }
  switch (res[templateId]) {
    case 'accept':
      return { state: 'accepted' };
    case 'ban':
      return { state: 'banned' };
    case 'filter':
      return { state: 'filtered' };
    case 'reject': {
      // A plain "no" and an "always no" look the same here; the settings tell them apart.
      const state = await subscriptionState(wx, templateId);
      return { state: state === 'switched_off' || state === 'always_rejected' ? state : 'rejected' };
    }
    default:
      return { state: 'error', errMsg: `no answer for template ${templateId}` };
  }
}

/**
 * The way back from "always reject" or a switched-off main switch: explain,
 * then open the settings page. Resolves true when the settings page opened.
 * wx.openSetting only works from a user's tap, so it is called inside the
 * modal's own callback, not after a promise (which would lose the tap).
 */
function guideToSettings(wx) {
  return new Promise((resolve) => {
    wx.showModal({
      title: '开启分配通知',
      content: '你已关闭“客户分配通知”。在设置页打开“订阅消息”并允许该通知后，回到这里再点一次“接收分配通知”。',
      confirmText: '去设置',
      cancelText: '暂不',
      success(res) {
        if (!res.confirm) return resolve(false);
        wx.openSetting({
          withSubscriptions: true,
          success: () => resolve(true),
          fail: () => resolve(false),
        });
      },
      fail: () => resolve(false),
    });
  });
}

module.exports = { askForNotices, guideToSettings, subscriptionState, MAIN_SWITCH_OFF };
