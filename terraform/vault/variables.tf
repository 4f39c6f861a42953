variable "broker_jwt_discovery_url" {
  description = "OIDC discovery URL of the platform that gives the broker its workload identity (e.g. the Kubernetes service-account issuer)."
  type        = string
}

variable "broker_jwt_audience" {
  description = "The audience of the broker's own identity token when it logs in to Vault."
  type        = string
  default     = "vault"
}

variable "broker_jwt_subject" {
  description = "The subject of the broker's own identity token (its service account)."
  type        = string
  default     = "system:serviceaccount:broker:model-credential-broker"
}

variable "postgres_connection_url" {
  description = "Where Vault reaches the evaluation-results database, with {{username}} and {{password}} placeholders."
  type        = string
}

variable "postgres_username" {
  description = "The database user Vault creates and drops logins with."
  type        = string
}

variable "postgres_password" {
  description = "That user's password (rotate it with Vault's rotate-root afterwards)."
  type        = string
  sensitive   = true
}

variable "eval_results_creation_statements" {
  description = "SQL that creates one evaluation-results login; Vault fills in name, password and expiration."
  type        = list(string)
  default = [
    "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';",
    "GRANT CONNECT ON DATABASE postgres TO \"{{name}}\";",
  ]
}
