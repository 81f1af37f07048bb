// The CRM's endpoint for the mini program's dialog answers
// (miniprogram/utils/report.js posts them): each answer becomes one
// `subscription.changed` event for wechat-notifier's grant ledger.
//
// The openid is the one the login binding stored for the signed-in user
// (`POST /wechat/session`), never one the client sends. A failure to publish
// answers 500: the mini program keeps the report and sends it again with the
// same answer id, which makes the same event id, counted once.
import { BadRequestException, Body, Controller, HttpCode, Post, Req } from '@nestjs/common';
import {
  answerProblem,
  SubscriptionAnswer,
  SubscriptionChangedPublisher,
} from './subscription-changed.publisher';

/** What the endpoint needs of the CRM's users: the openid bound at login. */
export abstract class CrmUsers {
  abstract wechatOpenid(userId: string): Promise<string | undefined>;
}

/** The request as the CRM's session guard leaves it: the signed-in salesperson. */
export interface CrmRequest {
  user: { id: string | number };
}

@Controller('wechat')
export class SubscriptionsController {
  constructor(
    private readonly publisher: SubscriptionChangedPublisher,
    private readonly users: CrmUsers,
  ) {}

  // In the CRM, also @UseGuards(CrmSessionGuard): only a signed-in user answers for themself.
  @Post('subscriptions')
  @HttpCode(204)
  async answered(@Req() req: CrmRequest, @Body() body: unknown): Promise<void> {
    const problem = answerProblem(body);
    if (problem) throw new BadRequestException(problem);
    const userId = String(req.user.id);
    const openid = await this.users.wechatOpenid(userId);
    await this.publisher.answered({ user_id: userId, ...(openid ? { openid } : {}) }, body as SubscriptionAnswer);
  }
}
