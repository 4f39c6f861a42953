# One policy per (model, action), exactly as broker.backends.vault.plan_vault renders them for
# examples/policy.yaml (evaluate on llama-7b gets database logins, see database.tf). For another
# policy file, render them again: docs/backends/vault.md, "Terraform".
locals {
  model_policies = {
    "broker-llama-7b-deploy-weights"     = <<-EOT
      # Rendered by the model-credential broker for model llama-7b, action deploy-weights.
      # Change the broker's policy file and render again; do not edit this policy.
      path "secret/data/models/llama-7b/*" {
        capabilities = ["read", "list"]
      }

      path "secret/data/models/llama-7b/weights/*" {
        capabilities = ["create", "read", "update", "list"]
      }
    EOT
    "broker-llama-7b-edit-safety-filter" = <<-EOT
      # Rendered by the model-credential broker for model llama-7b, action edit-safety-filter.
      # Change the broker's policy file and render again; do not edit this policy.
      path "secret/data/models/llama-7b/*" {
        capabilities = ["read", "list"]
      }

      path "secret/data/models/llama-7b/safety-filter/*" {
        capabilities = ["create", "read", "update", "list"]
      }
    EOT
    "broker-llama-7b-evaluate"           = <<-EOT
      # Rendered by the model-credential broker for model llama-7b, action evaluate.
      # Change the broker's policy file and render again; do not edit this policy.
      path "database/creds/llama-7b-eval-results" {
        capabilities = ["read"]
      }
    EOT
    "broker-llama-7b-fine-tune"          = <<-EOT
      # Rendered by the model-credential broker for model llama-7b, action fine-tune.
      # Change the broker's policy file and render again; do not edit this policy.
      path "secret/data/models/llama-7b/*" {
        capabilities = ["read", "list"]
      }

      path "secret/data/models/llama-7b/checkpoints/*" {
        capabilities = ["create", "read", "update", "list"]
      }
    EOT
  }
}

resource "vault_policy" "model" {
  for_each = local.model_policies
  name     = each.key
  policy   = each.value
}

# The broker's own token: issue through the token role, revoke and reconcile. Nothing else.
resource "vault_policy" "broker" {
  name   = "model-credential-broker"
  policy = <<-EOT
    # What the model-credential broker's own Vault token may do. Nothing else.
    path "auth/token/create/broker-issuer" {
      capabilities = ["update"]
    }

    path "auth/token/lookup-accessor" {
      capabilities = ["update"]
    }

    path "auth/token/revoke-accessor" {
      capabilities = ["update"]
    }

    path "auth/token/accessors" {
      capabilities = ["list", "sudo"]
    }

    path "auth/token/lookup-self" {
      capabilities = ["read"]
    }

    path "auth/token/roles/broker-issuer" {
      capabilities = ["read"]
    }

    path "sys/policies/acl/broker-*" {
      capabilities = ["read"]
    }

    path "sys/leases/renew/database/creds/llama-7b-eval-results/*" {
      capabilities = ["update"]
    }

    path "sys/leases/revoke/database/creds/llama-7b-eval-results/*" {
      capabilities = ["update"]
    }
  EOT
}
