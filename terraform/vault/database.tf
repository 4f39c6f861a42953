# Dynamic database logins for `evaluate` on llama-7b: evaluation runs write their scores to the
# evaluation-results database. The role's TTLs are the longest action TTL that uses it (1h); the
# broker shortens each lease to its grant's TTL.
resource "vault_mount" "database" {
  path = "database"
  type = "database"
}

resource "vault_database_secret_backend_connection" "eval_results" {
  backend       = vault_mount.database.path
  name          = "eval-results"
  allowed_roles = ["llama-7b-eval-results"]

  postgresql {
    connection_url = var.postgres_connection_url
    username       = var.postgres_username
    password       = var.postgres_password
  }
}

resource "vault_database_secret_backend_role" "llama_7b_eval_results" {
  backend             = vault_mount.database.path
  name                = "llama-7b-eval-results"
  db_name             = vault_database_secret_backend_connection.eval_results.name
  creation_statements = var.eval_results_creation_statements
  default_ttl         = 3600
  max_ttl             = 3600
}
