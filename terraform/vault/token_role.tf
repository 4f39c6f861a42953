# Every token the broker hands out is created through this role: its allowed_policies bound what
# the broker can ever hand out, and every token is an orphan (it survives the broker's own token)
# that cannot be renewed past its grant. The broker asks for ttl = explicit_max_ttl = grant TTL;
# the cap here is the longest action max_ttl (fine-tune: 4h).
resource "vault_token_auth_backend_role" "issuer" {
  role_name              = "broker-issuer"
  allowed_policies       = sort(keys(local.model_policies))
  orphan                 = true
  renewable              = false
  token_explicit_max_ttl = 14400
  token_type             = "service"
}
