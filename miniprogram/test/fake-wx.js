// A hand-made fake of the `wx` APIs the mini program uses. It behaves as
// WeChat does where the code depends on it:
// - callbacks come asynchronously, success or fail, never both;
// - requestSubscribeMessage and openSetting work only during a user's tap:
//   synchronously inside a tap handler (`tap()`), or inside the success
//   callback of a modal the user confirmed; otherwise they fail as WeChat
//   does ("can only be invoked by user TAP gesture");
// - requestSubscribeMessage fails with errCode 20004 when the subscription
//   main switch is off, and otherwise answers { [tmplId]: 'accept' | 'reject' | … }.
'use strict';

function fakeWx(script = {}) {
  const state = {
    calls: [], // { name, options } in call order
    storage: new Map(Object.entries(script.storage || {})),
    gesture: 0, // > 0 while a tap is being handled
    // What the settings page holds: { mainSwitch, itemSettings }.
    subscriptions: script.subscriptions || { mainSwitch: true, itemSettings: {} },
    // The answer the user gives in the dialog, per template.
    answers: script.answers || {},
    // CRM answers by "METHOD path": { statusCode, data }.
    crm: script.crm || {},
    crmBase: script.crmBase || '',
    loginFails: script.loginFails || false,
    modalConfirms: script.modalConfirms !== undefined ? script.modalConfirms : true,
    settingsOpened: 0, // times the settings page really opened
  };

  function later(fn) {
    setImmediate(fn);
  }

  function api(name, answer) {
    return (options = {}) => {
      state.calls.push({ name, options });
      const duringTap = state.gesture > 0;
      const [ok, value, inGesture] = answer(options, duringTap);
      later(() => {
        if (inGesture) state.gesture += 1;
        try {
          if (ok) options.success && options.success(value);
          else options.fail && options.fail(value);
        } finally {
          if (inGesture) state.gesture -= 1;
        }
      });
    };
  }

  const noTap = (name) => [
    false,
    { errMsg: `${name}:fail can only be invoked by user TAP gesture.`, errCode: 10001 },
  ];

  const wx = {
    __state: state,
    called: (name) => state.calls.filter((c) => c.name === name).map((c) => c.options),
    getStorageSync: (key) => (state.storage.has(key) ? state.storage.get(key) : ''),
    setStorageSync: (key, value) => state.storage.set(key, value),

    login: api('login', () =>
      state.loginFails
        ? [false, { errMsg: 'login:fail network error' }]
        : [true, { code: `code-${state.calls.length}`, errMsg: 'login:ok' }],
    ),

    request: api('request', (options) => {
      const path = options.url.startsWith(state.crmBase)
        ? options.url.slice(state.crmBase.length)
        : options.url;
      const key = `${options.method || 'GET'} ${path.split('?')[0]}`;
      const res = state.crm[key] || { statusCode: 404, data: { message: 'not found' } };
      return [true, { statusCode: res.statusCode, data: res.data, errMsg: 'request:ok' }];
    }),

    requestSubscribeMessage: api('requestSubscribeMessage', (options, duringTap) => {
      if (!duringTap) return noTap('requestSubscribeMessage');
      if (!state.subscriptions.mainSwitch) {
        return [false, { errCode: 20004, errMsg: 'requestSubscribeMessage:fail main switch is off' }];
      }
      const res = { errMsg: 'requestSubscribeMessage:ok' };
      for (const id of options.tmplIds) {
        // An "always" choice in the settings answers without a dialog.
        res[id] = state.subscriptions.itemSettings[id] || state.answers[id] || 'reject';
      }
      return [true, res];
    }),

    getSetting: api('getSetting', (options) => {
      const res = { authSetting: {}, errMsg: 'getSetting:ok' };
      if (options.withSubscriptions) {
        res.subscriptionsSetting = JSON.parse(JSON.stringify(state.subscriptions));
      }
      return [true, res];
    }),

    // The user's tap on the modal's button is a gesture for its callback.
    showModal: api('showModal', () => [
      true,
      { confirm: state.modalConfirms, cancel: !state.modalConfirms, errMsg: 'showModal:ok' },
      true,
    ]),

    openSetting: api('openSetting', (options, duringTap) => {
      if (!duringTap) return noTap('openSetting');
      state.settingsOpened += 1;
      return [true, { errMsg: 'openSetting:ok' }];
    }),

    showToast: api('showToast', () => [true, { errMsg: 'showToast:ok' }]),
  };
  return wx;
}

/** Runs a handler as WeChat runs a bindtap: its synchronous part is the tap. */
function tap(wx, fn) {
  wx.__state.gesture += 1;
  try {
    return fn();
  } finally {
    wx.__state.gesture -= 1;
  }
}

module.exports = { fakeWx, tap };
