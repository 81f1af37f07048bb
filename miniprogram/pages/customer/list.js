// The page a notice opens (the template's page, `pages/customer/list?notice=…`):
// the customers just assigned, and the button that asks for the next notice.
// WeChat shows the subscription dialog only from a tap, so the request is the
// first thing the tap handler does (an await before it would lose the tap).
'use strict';

const config = require('../../config');
const crm = require('../../utils/crm');
const { askForNotices, guideToSettings, subscriptionState } = require('../../utils/subscribe');

Page({
  data: {
    notice: '',
    customers: [],
    loading: true,
    error: '',
    // ask | always_accepted | accepted | rejected | always_rejected | switched_off | banned | filtered | error
    subscription: 'ask',
  },

  onLoad(options) {
    this.setData({ notice: (options && options.notice) || '' });
    return this.loadCustomers();
  },

  // Also runs on the way back from the settings page.
  onShow() {
    return this.refreshSubscription();
  },

  async loadCustomers() {
    const query = this.data.notice ? `?notice=${encodeURIComponent(this.data.notice)}` : '';
    try {
      const body = await crm.request(wx, { path: `/customers/assigned${query}` });
      this.setData({ customers: body.customers || [], loading: false, error: '' });
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
    if (result.state !== 'error') {
      // The CRM keeps each salesperson's last answer, so a manager can see
      // who switched the notices off. Advisory: WeChat holds the real
      // authorisations, so a failed report is not the user's problem.
      await crm
        .request(wx, {
          path: '/wechat/subscriptions',
          method: 'POST',
          data: { template_id: config.templateId, result: result.state },
        })
        .catch(() => {});
    }
    return result.state;
  },

  // bindtap of 去设置打开分配通知 (shown while the subscription is off).
  onOpenSettings() {
    return guideToSettings(wx);
  },
});
