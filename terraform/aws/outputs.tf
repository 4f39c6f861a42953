output "role_arns" {
  description = "Model name => its role ARN (models.<name>.backends.aws.role_arn in the broker policy)."
  value       = { for name, role in aws_iam_role.model : name => role.arn }
}

output "broker_policy_models" {
  description = "Model name => the backends.aws settings to paste into the broker's policy file."
  value = {
    for name, m in var.models : name => {
      role_arn  = aws_iam_role.model[name].arn
      s3_prefix = m.s3_prefix
    }
  }
}

output "broker_principal_policy_json" {
  description = "An identity policy for the broker's own principal: assume, tag and set the source identity on the model roles, and maintain their broker-revocations policy."
  value = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        Sid      = "AssumeModelRoles"
        Effect   = "Allow"
        Action   = ["sts:AssumeRole", "sts:TagSession", "sts:SetSourceIdentity"]
        Resource = [for role in aws_iam_role.model : role.arn]
      },
      {
        Sid      = "MaintainRevocations"
        Effect   = "Allow"
        Action   = ["iam:GetRole", "iam:GetRolePolicy", "iam:ListRolePolicies", "iam:PutRolePolicy"]
        Resource = [for role in aws_iam_role.model : role.arn]
      },
    ]
  })
}

output "trust_policies" {
  description = "Model name => its role's trust policy (JSON)."
  value       = { for name, _ in var.models : name => jsonencode(local.trust_policy[name]) }
}
