# One IAM role per model for the broker's aws backend (docs/backends/aws.md).
#
# - trust: only the broker's principal, only with the session tags grant_id, model, action, tier
#   (model = this model) and a source identity;
# - permissions: the union of the actions' S3 operations under the model's prefix, as a managed
#   policy; each session is narrowed further by the broker's session policy;
# - a permissions boundary with the same ceiling, so that the broker's iam:PutRolePolicy (needed
#   for revocation) can never widen the role;
# - the inline policy broker-revocations, created empty; the broker owns its content afterwards.
#
# Policies are built with jsonencode rather than aws_iam_policy_document so that plans (and the
# mock-provider tests) see their exact text.

locals {
  session_tag_keys = ["grant_id", "model", "action", "tier"]
  read_paths       = distinct(flatten([for a in values(var.action_access) : a.read]))
  write_paths      = distinct(flatten([for a in values(var.action_access) : a.write]))

  s3_paths = { for name, m in var.models : name => trimprefix(m.s3_prefix, "s3://") }
  s3 = {
    for name, path in local.s3_paths : name => {
      bucket     = split("/", path)[0]
      key_prefix = substr(path, length(split("/", path)[0]) + 1, -1)
    }
  }

  # What the role may do at most: the same document is its permissions and its boundary.
  s3_policy = {
    for name, loc in local.s3 : name => {
      Version = "2012-10-17"
      Statement = concat(
        [
          for statement in [
            {
              Sid      = "ReadModelObjects"
              Effect   = "Allow"
              Action   = ["s3:GetObject"]
              Resource = [for p in local.read_paths : "arn:${var.partition}:s3:::${loc.bucket}/${loc.key_prefix}${p}*"]
            },
            merge(
              {
                Sid      = "ListModelPrefix"
                Effect   = "Allow"
                Action   = ["s3:ListBucket"]
                Resource = ["arn:${var.partition}:s3:::${loc.bucket}"]
              },
              # Listing the whole bucket needs no condition; anything narrower does.
              {
                for key, condition in {
                  Condition = {
                    StringLike = {
                      "s3:prefix" = flatten([for p in local.read_paths : ["${loc.key_prefix}${p}", "${loc.key_prefix}${p}*"]])
                    }
                  }
                } : key => condition if anytrue([for p in local.read_paths : "${loc.key_prefix}${p}" != ""])
              },
            ),
          ] : statement if length(local.read_paths) > 0
        ],
        [
          for statement in [
            {
              Sid      = "WriteModelObjects"
              Effect   = "Allow"
              Action   = ["s3:PutObject", "s3:AbortMultipartUpload"]
              Resource = [for p in local.write_paths : "arn:${var.partition}:s3:::${loc.bucket}/${loc.key_prefix}${p}*"]
            },
          ] : statement if length(local.write_paths) > 0
        ],
      )
    }
  }

  trust_policy = {
    for name, _ in var.models : name => {
      Version = "2012-10-17"
      Statement = [
        {
          # Every session must carry the four tags (this model's name in `model`) and a
          # source identity: AssumeRole without them is refused.
          Sid       = "AssumeWithGrantTags"
          Effect    = "Allow"
          Principal = { AWS = var.broker_principal_arn }
          Action    = "sts:AssumeRole"
          Condition = {
            Null = merge(
              { for k in local.session_tag_keys : "aws:RequestTag/${k}" => "false" },
              { "sts:SourceIdentity" = "false" },
            )
            StringEquals = { "aws:RequestTag/model" = name }
            StringLike   = { "aws:RequestTag/grant_id" = "g_*" }
          }
        },
        {
          # Only these tag keys, all of them transitive, and only known tiers.
          Sid       = "TagGrantSessions"
          Effect    = "Allow"
          Principal = { AWS = var.broker_principal_arn }
          Action    = "sts:TagSession"
          Condition = {
            "ForAllValues:StringEquals" = {
              "aws:TagKeys"           = local.session_tag_keys
              "sts:TransitiveTagKeys" = local.session_tag_keys
            }
            StringEquals = {
              "aws:RequestTag/model" = name
              "aws:RequestTag/tier"  = var.tiers
            }
          }
        },
        {
          Sid       = "SetWorkloadSourceIdentity"
          Effect    = "Allow"
          Principal = { AWS = var.broker_principal_arn }
          Action    = "sts:SetSourceIdentity"
          Condition = { Null = { "sts:SourceIdentity" = "false" } }
        },
      ]
    }
  }

  # What the broker writes first and after every prune that empties it: a Deny on sessions
  # issued before the epoch, i.e. nothing (RevocationPolicy.empty() in broker/backends/aws.py).
  empty_revocations = {
    Version = "2012-10-17"
    Statement = [
      {
        Sid       = "BrokerRevokedIssuedBeforeUntil0"
        Effect    = "Deny"
        Action    = "*"
        Resource  = "*"
        Condition = { DateLessThan = { "aws:TokenIssueTime" = "1970-01-01T00:00:00Z" } }
      },
    ]
  }
}

resource "aws_iam_policy" "boundary" {
  for_each = var.models

  name        = "${var.role_name_prefix}${each.key}-boundary"
  path        = var.role_path
  description = "Permissions boundary of model ${each.key}'s role: at most these S3 operations under ${each.value.s3_prefix}"
  policy      = jsonencode(local.s3_policy[each.key])
  tags        = var.tags
}

resource "aws_iam_policy" "s3" {
  for_each = var.models

  name        = "${var.role_name_prefix}${each.key}-s3"
  path        = var.role_path
  description = "S3 access of model ${each.key}'s role (each broker session is narrowed to its action)"
  policy      = jsonencode(local.s3_policy[each.key])
  tags        = var.tags
}

resource "aws_iam_role" "model" {
  for_each = var.models

  lifecycle {
    precondition {
      condition     = length("${var.role_name_prefix}${each.key}") <= 64
      error_message = "IAM role names have at most 64 characters: shorten role_name_prefix or the model name."
    }
  }

  name                 = "${var.role_name_prefix}${each.key}"
  path                 = var.role_path
  description          = "Model ${each.key}: assumed by the model-credential broker, one session per grant"
  assume_role_policy   = jsonencode(local.trust_policy[each.key])
  permissions_boundary = aws_iam_policy.boundary[each.key].arn
  max_session_duration = var.max_session_duration
  tags                 = merge(var.tags, { "broker-model" = each.key })
}

resource "aws_iam_role_policy_attachment" "s3" {
  for_each = var.models

  role       = aws_iam_role.model[each.key].name
  policy_arn = aws_iam_policy.s3[each.key].arn
}

resource "aws_iam_role_policy" "revocations" {
  for_each = var.models

  name   = "broker-revocations"
  role   = aws_iam_role.model[each.key].name
  policy = jsonencode(local.empty_revocations)

  lifecycle {
    # NOTE: the broker rewrites this policy to revoke grants; a later apply must not reset it
    # (that would bring revoked sessions back to life).
    ignore_changes = [policy]
  }
}
