# The Vault/OpenBao side of the model-credential broker's `vault` backend, for the policy in
# examples/policy.yaml. What each piece is for: docs/backends/vault.md.
#
# Configure the provider the Vault way (VAULT_ADDR, and a token allowed to manage policies, auth
# methods and mounts). tests/backends/vault/test_terraform.py checks that this module and the
# broker's own renderer (broker.backends.vault.plan_vault) agree on every name, policy and TTL.
terraform {
  required_version = ">= 1.5"

  required_providers {
    vault = {
      source  = "hashicorp/vault"
      version = ">= 4.0"
    }
  }
}
