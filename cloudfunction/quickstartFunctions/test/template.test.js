// The truncation rules, on the same cases the Rust service's unit test reads
// (src/wechat/template.rs), so the function and the direct mode cut alike.
'use strict';

const test = require('node:test');
const assert = require('node:assert/strict');
const cases = require('./template-cases.json');
const { buildData, cut, keywordLimit } = require('../template');

for (const c of cases) {
  test(`shared case: ${c.name}`, () => {
    const data = buildData(c.mapping, c.notice);
    for (const [key, value] of Object.entries(c.data)) {
      assert.deepEqual(data[key], { value }, key);
    }
  });
}

test('cutting counts characters, not bytes or UTF-16 units', () => {
  assert.equal(cut('上海某某贸易有限公司', 5), '上海某某…');
  assert.equal(cut('𠮷𠮷𠮷𠮷𠮷𠮷', 3), '𠮷𠮷…');
  assert.equal(cut('abc', 5), 'abc');
});

test('a keyword with an unknown type is refused', () => {
  assert.equal(keywordLimit('thing12'), 20);
  assert.throws(() => keywordLimit('weird1'), /unknown keyword type/);
  assert.throws(() => keywordLimit('thing'), /unknown keyword type/);
});
