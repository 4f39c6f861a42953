#!/usr/bin/env bash
# Checks the Terraform modules offline: init (providers from a local mirror), fmt, validate, test.
#
# The hashicorp/aws provider comes from a filesystem mirror, a folder holding
# registry.terraform.io/hashicorp/aws/<version>/<os_arch>/. Set TF_PLUGIN_MIRROR to that folder,
# or let this script look for it. Everything Terraform writes (.terraform, the lock file, plans)
# goes to a temporary working copy, never into the repository.
#
#   terraform/check.sh            init + fmt -check + validate + test every module
#   terraform/check.sh --mirror   only print the mirror folder (for -plugin-dir) and exit
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
modules=("aws")

command -v terraform >/dev/null || { echo "check.sh: terraform is not installed" >&2; exit 2; }

find_mirror() {
  if [[ -n "${TF_PLUGIN_MIRROR:-}" ]]; then
    echo "$TF_PLUGIN_MIRROR"
    return
  fi
  local roots=(/opt /usr/local/share /usr/share "${HOME:-/root}/.terraform.d" /usr/local/lib /var/lib)
  local found
  for root in "${roots[@]}" /; do
    [[ -d "$root" ]] || continue
    found="$(find "$root" -xdev \( -path /proc -o -path /sys -o -path /dev \) -prune -o \
      -type d -path '*/registry.terraform.io/hashicorp/aws' -print -quit 2>/dev/null || true)"
    if [[ -n "$found" ]]; then
      dirname "$(dirname "$(dirname "$found")")"
      return
    fi
  done
  return 1
}

mirror="$(find_mirror)" || {
  echo "check.sh: no provider mirror with registry.terraform.io/hashicorp/aws found; set TF_PLUGIN_MIRROR" >&2
  exit 2
}
[[ -d "$mirror/registry.terraform.io/hashicorp/aws" ]] || {
  echo "check.sh: $mirror has no registry.terraform.io/hashicorp/aws" >&2
  exit 2
}
if [[ "${1:-}" == "--mirror" ]]; then
  echo "$mirror"
  exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export CHECKPOINT_DISABLE=1 TF_IN_AUTOMATION=1 TF_INPUT=0
# A CLI config that does not exist only produces warnings; use an empty one then.
if [[ -n "${TF_CLI_CONFIG_FILE:-}" && ! -f "$TF_CLI_CONFIG_FILE" ]]; then
  : >"$work/terraformrc"
  export TF_CLI_CONFIG_FILE="$work/terraformrc"
fi

echo "== terraform fmt -check -recursive $here"
terraform fmt -check -recursive -diff "$here"

for module in "${modules[@]}"; do
  copy="$work/$module"
  mkdir -p "$copy"
  (cd "$here/$module" && tar --exclude=.terraform --exclude='.terraform.lock.hcl' --exclude='*.tfstate*' -cf - .) | tar -xf - -C "$copy"
  export TF_DATA_DIR="$copy/.terraform"
  echo "== $module: init (providers from $mirror)"
  terraform -chdir="$copy" init -backend=false -plugin-dir="$mirror" -no-color >/dev/null
  echo "== $module: validate"
  terraform -chdir="$copy" validate -no-color
  echo "== $module: test"
  terraform -chdir="$copy" test -no-color
done
echo "== ok"
