# The broker's own login: Vault's JWT auth, with the broker's workload identity token. The token
# it gets carries only the model-credential-broker policy and lives 15 minutes; the broker logs
# in again before it expires.
resource "vault_jwt_auth_backend" "broker" {
  path               = "jwt"
  type               = "jwt"
  oidc_discovery_url = var.broker_jwt_discovery_url
  bound_issuer       = var.broker_jwt_discovery_url
}

resource "vault_jwt_auth_backend_role" "broker" {
  backend                 = vault_jwt_auth_backend.broker.path
  role_name               = "model-credential-broker"
  role_type               = "jwt"
  user_claim              = "sub"
  bound_audiences         = [var.broker_jwt_audience]
  bound_subject           = var.broker_jwt_subject
  token_policies          = [vault_policy.broker.name]
  token_no_default_policy = true
  token_ttl               = 900
  token_max_ttl           = 900
}
