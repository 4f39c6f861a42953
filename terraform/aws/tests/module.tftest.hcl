# Plans the module against a mock AWS provider: no credentials, no network.
# The policies are built with jsonencode, so their exact text is known at plan time.

mock_provider "aws" {
  mock_resource "aws_iam_policy" {
    override_during = plan
    defaults = {
      arn = "arn:aws:iam::123456789012:policy/mock"
    }
  }
}

variables {
  broker_principal_arn = "arn:aws:iam::123456789012:role/model-broker"
  models = {
    "llama-7b" = { s3_prefix = "s3://models/llama-7b/" }
    "whole"    = { s3_prefix = "s3://weights-bucket/" }
  }
}

run "roles_and_trust" {
  command = plan

  assert {
    condition     = toset(keys(aws_iam_role.model)) == toset(["llama-7b", "whole"])
    error_message = "expected one role per model"
  }
  assert {
    condition     = aws_iam_role.model["llama-7b"].name == "model-llama-7b"
    error_message = "role name must be <role_name_prefix><model>"
  }
  assert {
    condition     = aws_iam_role.model["llama-7b"].permissions_boundary == "arn:aws:iam::123456789012:policy/mock"
    error_message = "every role needs the permissions boundary"
  }
  assert {
    condition     = aws_iam_role.model["llama-7b"].max_session_duration == 3600
    error_message = "default MaxSessionDuration is 1 h"
  }

  # The trust policy: only the broker, only with the grant's tags and a source identity.
  assert {
    condition     = jsondecode(aws_iam_role.model["llama-7b"].assume_role_policy).Statement[0].Principal.AWS == "arn:aws:iam::123456789012:role/model-broker"
    error_message = "only the broker's principal may assume the role"
  }
  assert {
    condition     = jsondecode(aws_iam_role.model["llama-7b"].assume_role_policy).Statement[0].Condition.Null == { "aws:RequestTag/action" = "false", "aws:RequestTag/grant_id" = "false", "aws:RequestTag/model" = "false", "aws:RequestTag/tier" = "false", "sts:SourceIdentity" = "false" }
    error_message = "AssumeRole must require all four session tags and a source identity"
  }
  assert {
    condition     = jsondecode(aws_iam_role.model["llama-7b"].assume_role_policy).Statement[0].Condition.StringEquals["aws:RequestTag/model"] == "llama-7b"
    error_message = "the model tag must name this role's model"
  }
  assert {
    condition     = jsondecode(aws_iam_role.model["llama-7b"].assume_role_policy).Statement[1].Action == "sts:TagSession"
    error_message = "statement 1 allows sts:TagSession"
  }
  assert {
    condition     = jsondecode(aws_iam_role.model["llama-7b"].assume_role_policy).Statement[1].Condition["ForAllValues:StringEquals"]["aws:TagKeys"] == ["grant_id", "model", "action", "tier"]
    error_message = "only the broker's four tag keys may be set"
  }
  assert {
    condition     = jsondecode(aws_iam_role.model["llama-7b"].assume_role_policy).Statement[2].Action == "sts:SetSourceIdentity"
    error_message = "statement 2 allows sts:SetSourceIdentity"
  }
  assert {
    # IAM's default trust-policy quota is 2,048 characters, whitespace not counted.
    condition     = length(replace(aws_iam_role.model["llama-7b"].assume_role_policy, "/\\s/", "")) <= 2048
    error_message = "trust policy exceeds 2,048 characters"
  }
}

run "permissions_boundary_and_revocations" {
  command = plan

  assert {
    condition     = jsondecode(aws_iam_policy.s3["llama-7b"].policy).Statement[0].Resource == ["arn:aws:s3:::models/llama-7b/*"]
    error_message = "reads are limited to the model's prefix"
  }
  assert {
    condition     = jsondecode(aws_iam_policy.s3["llama-7b"].policy).Statement[1].Condition.StringLike["s3:prefix"] == ["llama-7b/", "llama-7b/*"]
    error_message = "listing is limited to the model's prefix"
  }
  assert {
    condition     = jsondecode(aws_iam_policy.s3["llama-7b"].policy).Statement[2].Resource == ["arn:aws:s3:::models/llama-7b/checkpoints/*"]
    error_message = "fine-tune writes only checkpoints"
  }
  assert {
    condition     = !can(jsondecode(aws_iam_policy.s3["whole"].policy).Statement[1].Condition)
    error_message = "a whole-bucket model lists without a prefix condition"
  }
  assert {
    condition     = aws_iam_policy.boundary["llama-7b"].policy == aws_iam_policy.s3["llama-7b"].policy
    error_message = "the boundary is the same ceiling as the role's permissions"
  }

  # broker-revocations starts empty.
  assert {
    condition     = aws_iam_role_policy.revocations["llama-7b"].name == "broker-revocations"
    error_message = "the broker looks for the inline policy broker-revocations"
  }
  assert {
    condition     = jsondecode(aws_iam_role_policy.revocations["llama-7b"].policy).Statement[0].Condition.DateLessThan["aws:TokenIssueTime"] == "1970-01-01T00:00:00Z"
    error_message = "the empty revocation policy denies sessions issued before the epoch, i.e. none"
  }
}

run "read_only_access" {
  command = plan

  variables {
    action_access = { evaluate = {} }
  }

  assert {
    condition     = length(jsondecode(aws_iam_policy.s3["llama-7b"].policy).Statement) == 2
    error_message = "without write paths the role only reads and lists"
  }
}

run "rejects_prefix_without_trailing_slash" {
  command = plan

  variables {
    models = { "llama-7b" = { s3_prefix = "s3://models/llama-7b" } }
  }

  expect_failures = [var.models]
}

run "rejects_wildcards_in_prefix" {
  command = plan

  variables {
    models = { "llama-7b" = { s3_prefix = "s3://models/llama-*/" } }
  }

  expect_failures = [var.models]
}

run "rejects_short_max_session" {
  command = plan

  variables {
    max_session_duration = 900
  }

  expect_failures = [var.max_session_duration]
}

run "rejects_model_names_iam_cannot_use" {
  command = plan

  variables {
    models = { "llama:7b" = { s3_prefix = "s3://models/llama-7b/" } }
  }

  expect_failures = [var.models]
}
