// Binds the WeChat user to the signed-in CRM user at every launch (the
// login code is single-use, and a salesperson may switch WeChat accounts),
// so the CRM always has the openid its events carry.
'use strict';

const { bindWechat } = require('./utils/crm');

App({
  onLaunch() {
    return bindWechat(wx).catch((err) => {
      // Not signed in to the CRM yet: the CRM sign-in calls bindWechat too.
      console.warn(err.message);
    });
  },
});
