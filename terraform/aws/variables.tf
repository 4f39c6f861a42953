variable "broker_principal_arn" {
  description = "ARN of the IAM role (or user) the broker runs as: the only principal trusted to assume the model roles."
  type        = string

  validation {
    condition     = can(regex("^arn:aws[a-z-]*:(iam|sts)::[0-9]{12}:", var.broker_principal_arn))
    error_message = "broker_principal_arn must be an IAM ARN such as arn:aws:iam::123456789012:role/model-broker."
  }
}

variable "models" {
  description = "The models the broker guards: name => the S3 folder holding its weights (s3://bucket/prefix/). The name must match the broker policy's models key."
  type = map(object({
    s3_prefix = string
  }))

  validation {
    # Same rule as the broker (broker/backends/aws.py S3Location): a folder, no IAM wildcards.
    condition     = alltrue([for m in values(var.models) : can(regex("^s3://[a-z0-9.-]+/([^*?$]*/)?$", m.s3_prefix))])
    error_message = "Each s3_prefix must look like s3://bucket/folder/ (ending with /, without * ? or $)."
  }

  validation {
    # A model name is a session tag value and part of an IAM role name: both charsets allow these.
    condition     = alltrue([for name in keys(var.models) : can(regex("^[A-Za-z0-9_.=+@-]+$", name))])
    error_message = "Model names must use only letters, digits and _ . = + - @ (session tag values and IAM role names)."
  }
}

variable "action_access" {
  description = "What each action may do under a model's prefix (paths relative to it; \"\" is all of it). Mirrors DEFAULT_ACTION_ACCESS in broker/backends/aws.py; the role is granted the union, each session is narrowed to its action."
  type = map(object({
    read  = optional(list(string), [""])
    write = optional(list(string), [])
  }))
  default = {
    "evaluate"  = {}
    "fine-tune" = { write = ["checkpoints/"] }
  }
}

variable "tiers" {
  description = "The tier values the broker may put in the session tag `tier`."
  type        = list(string)
  default     = ["low", "elevated", "privileged"]
}

variable "role_name_prefix" {
  description = "Each model's role is named <prefix><model> (at most 64 characters)."
  type        = string
  default     = "model-"
}

variable "role_path" {
  description = "IAM path of the roles and policies."
  type        = string
  default     = "/"
}

variable "partition" {
  description = "AWS partition of the ARNs (aws, aws-cn, aws-us-gov)."
  type        = string
  default     = "aws"
}

variable "max_session_duration" {
  description = "The roles' MaxSessionDuration in seconds (3600-43200). Sessions over 1 h also need the broker's own credentials not to be a role session: role chaining caps at 1 h."
  type        = number
  default     = 3600

  validation {
    condition     = var.max_session_duration >= 3600 && var.max_session_duration <= 43200
    error_message = "max_session_duration must be between 3600 and 43200 seconds."
  }
}

variable "tags" {
  description = "Tags for every IAM resource created here."
  type        = map(string)
  default     = {}
}
