// The page a notice opens (the template's page, `pages/customer/list?notice=…`):
// the customers just assigned, and the button that asks for the next notice.
// WeChat shows the subscription dialog only from a tap, so the request is the
// first thing the tap handler does (an await before it would lose the tap).
'use strict';

const config = require('../../config');
const crm = require('../../utils/crm');
const { askForNotices, guideToSettings, subscriptionState } = require('../../utils/subscribe');
const { reportAnswer, flushReports } = require('../../utils/report');

Page({
  data: {
    notice: '',
    customers: [],
    // Assignments wechat-notifier holds for want of an accept, as the CRM
    // last heard from its notifier.notice_held signal (0: none).
    waiting: 0,
    loading: true,
    error: '',
    // ask | always_accepted | accepted | rejected | always_rejected | switched_off | banned | filtered | error
    subscription: 'ask',
  },

  onLoad(options) {
    this.setData({ notice: (options && options.notice) || '' });
    return this.loadCustomers();
  },

  // Also runs on the way back from the settings page. Answers the CRM did
  // not take last time are sent again here.
  onShow() {
    return Promise.all([this.refreshSubscription(), flushReports(wx)]);
  },

  async loadCustomers() {
    const query = this.data.notice ? `?notice=${encodeURIComponent(this.data.notice)}` : '';
    try {
      const body = await crm.request(wx, { path: `/customers/assigned${query}` });
      this.setData({
        customers: body.customers || [],
        waiting: body.notices_waiting || 0,
        loading: false,
        error: '',
      });
    } catch (err) {
      this.setData({ loading: false, error: err.message });
    }
  },

  async refreshSubscription() {
    try {
      this.setData({ subscription: await subscriptionState(wx, config.templateId) });
    } catch (err) {
      // Without the settings the button stays as it is; asking still works.
    }
  },

  // bindtap of 接收分配通知.
  async onAskNotices() {
    const result = await askForNotices(wx, config.templateId);
    this.setData({ subscription: result.state });
    if (result.state === 'accepted') {
      wx.showToast({ title: '下次分配会通知你', icon: 'success' });
    } else if (result.state === 'rejected') {
      wx.showToast({ title: '不会收到分配通知', icon: 'none' });
    } else if (result.state === 'always_rejected' || result.state === 'switched_off') {
      await guideToSettings(wx);
    }
    // Every answer goes to the CRM, which publishes it to wechat-notifier's
    // grant ledger: an accept releases the notices held for want of one. A
    // report that fails is kept and sent again (utils/report.js).
    await reportAnswer(wx, config.templateId, result.state);
    return result.state;
  },

  // bindtap of 去设置打开分配通知 (shown while the subscription is off).
  onOpenSettings() {
    return guideToSettings(wx);
  },
});
