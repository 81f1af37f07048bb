// What the mini program needs to know about its two back ends. The template
// id is the same subscribe-message template the notices are sent with: the
// cloud function's TEMPLATE_ID (or the service's WECHAT_TEMPLATE_ID in the
// direct mode). A user's consent is per template, so the two must match.
// No secret belongs here: the AppSecret stays on the CRM back end.
'use strict';

module.exports = {
  crmBaseUrl: 'https://crm.example.com/api', // must be a "request legal domain" of the mini program
  templateId: 'Xb1xCustomerAssignedTemplateId0000000000000', // 客户分配通知
};
