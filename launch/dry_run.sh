# Sourced by the launch scripts: `launch CMD...` runs CMD, or with DRY_RUN=1 prints it (shell-quoted,
# one line) instead, so the exact commands each host or task would run can be checked anywhere.
launch() {
  if [[ -n "${DRY_RUN:-}" && "${DRY_RUN}" != 0 ]]; then
    printf '%q ' "$@" | sed 's/ $//'
    echo
  else
    "$@"
  fi
}
