// Calls a callback-style wx API as a promise: `call(wx, 'login', {})`
// resolves with the success result and rejects with the fail result
// (which carries errMsg, and errCode where the API has one).
'use strict';

function call(wx, name, options = {}) {
  return new Promise((resolve, reject) => {
    wx[name]({ ...options, success: resolve, fail: reject });
  });
}

module.exports = { call };
