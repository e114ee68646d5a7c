#!/usr/bin/env bash
# Smoke test of the deployment on a machine with Docker (no GPU needed): builds the CPU images,
# brings up deploy/compose.cpu.yml (one teacher service hosting two tiny teachers, math and code,
# of two families; two students of other families), waits for the teacher service to be healthy
# (every teacher ready), checks /readyz (each teacher's too) and /v1/info with the key (and a
# refusal without it), lets both students train a few steps against both teachers, checks that
# each teacher scored, restarts one student to check that --resume continues its run, then tears
# everything down (volumes included).
#
# Usage: deploy/smoke.sh
# Environment: SMOKE_PORT (host port of the teacher, 18000), SMOKE_PROJECT (compose project name),
# SMOKE_HEALTH_TIMEOUT / SMOKE_TRAIN_TIMEOUT (seconds, 900 / 900), SMOKE_KEEP=1 (leave it running),
# TOKENBRIDGE_API_KEY (a random one by default).
set -euo pipefail
cd "$(dirname "$0")/.."

PROJECT="${SMOKE_PROJECT:-tokenbridge-smoke}"
HEALTH_TIMEOUT="${SMOKE_HEALTH_TIMEOUT:-900}"
TRAIN_TIMEOUT="${SMOKE_TRAIN_TIMEOUT:-900}"
export TEACHER_PORT="${SMOKE_PORT:-18000}"
export STUDENT_STEPS=2
if [[ -z "${TOKENBRIDGE_API_KEY:-}" ]]; then
    TOKENBRIDGE_API_KEY="smoke-$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
fi
export TOKENBRIDGE_API_KEY
BASE_URL="http://127.0.0.1:${TEACHER_PORT}"

log() { printf '[smoke %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
fail() { log "FAILED: $*"; exit 1; }

for tool in docker curl; do
    command -v "$tool" >/dev/null || fail "$tool is not installed"
done
if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null; then
    COMPOSE=(docker-compose)
else
    fail "neither 'docker compose' nor 'docker-compose' is available"
fi
COMPOSE+=(-p "$PROJECT" -f deploy/compose.cpu.yml)
compose() { "${COMPOSE[@]}" "$@"; }

finish() {
    local status=$?
    if [[ $status -ne 0 ]]; then
        log "last log lines of every service:"
        compose logs --no-color --tail 40 || true
    fi
    if [[ "${SMOKE_KEEP:-0}" == 1 ]]; then
        log "left running (SMOKE_KEEP=1): ${COMPOSE[*]} down -v"
    else
        log "tearing down"
        compose down -v --remove-orphans >/dev/null 2>&1 || true
    fi
    if [[ $status -eq 0 ]]; then log "PASSED"; fi
    exit "$status"
}
trap finish EXIT

# The id of SERVICE's container (empty while there is none).
container() {
    local ids
    ids="$(compose ps -a -q "$1" 2>/dev/null || true)"
    echo "${ids%%$'\n'*}"
}

# Whether SERVICE's log contains TEXT (read whole first: `logs | grep -q` trips pipefail).
log_has() {
    local logs
    logs="$(compose logs --no-color "$1")"
    [[ "$logs" == *"$2"* ]]
}

# Wait until SERVICE's health is "healthy" (at most TIMEOUT seconds).
wait_healthy() {
    local service=$1 timeout=$2 deadline=$((SECONDS + $2)) id status
    while ((SECONDS < deadline)); do
        id="$(container "$service")"
        status="$( [[ -n "$id" ]] && docker inspect -f '{{.State.Health.Status}}' "$id" || echo none)"
        case "$status" in
            healthy) log "$service is healthy"; return 0 ;;
            unhealthy) fail "$service is unhealthy" ;;
        esac
        sleep 5
    done
    fail "$service was not healthy after ${timeout} s"
}

# Wait until SERVICE's container has exited (at most TIMEOUT seconds); fail unless it exited 0.
wait_exited() {
    local service=$1 timeout=$2 deadline=$((SECONDS + $2)) id state
    while ((SECONDS < deadline)); do
        id="$(container "$service")"
        state="$( [[ -n "$id" ]] && docker inspect -f '{{.State.Status}} {{.State.ExitCode}}' "$id" \
            || echo 'none -1')"
        if [[ "$state" == exited* ]]; then
            [[ "$state" == "exited 0" ]] || fail "$service exited with code ${state#exited }"
            log "$service finished"
            return 0
        fi
        sleep 5
    done
    fail "$service had not finished after ${timeout} s"
}

# The HTTP status of GET PATH, with the key unless NOKEY is given.
http_status() {
    local path=$1 key=${2:-key}
    if [[ "$key" == key ]]; then
        curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer ${TOKENBRIDGE_API_KEY}" \
            "${BASE_URL}${path}"
    else
        curl -s -o /dev/null -w '%{http_code}' "${BASE_URL}${path}"
    fi
}

log "building the CPU images (teacher and trainer)"
compose build
log "starting the teacher service (after its tiny models are built)"
compose up -d teacher
wait_healthy teacher "$HEALTH_TIMEOUT"

[[ "$(http_status /healthz nokey)" == 200 ]] || fail "/healthz did not answer 200"
[[ "$(http_status /readyz)" == 200 ]] || fail "/readyz with the key did not answer 200"
[[ "$(http_status /readyz nokey)" == 401 ]] || fail "/readyz without a key was not refused (401)"
# JSON asked for: without an Accept header the service answers msgpack.
info="$(curl -sf -H "Authorization: Bearer ${TOKENBRIDGE_API_KEY}" \
    -H "Accept: application/json" "${BASE_URL}/v1/info")" || fail "/v1/info with the key failed"
[[ "$info" == *'"max_top_k"'* ]] || fail "/v1/info does not describe the teacher: $info"
[[ "$info" == *'"default_teacher":"math"'* && "$info" == *'"teachers":['* ]] \
    || fail "/v1/info does not describe the teachers: $info"
for teacher in math code; do
    [[ "$(http_status "/readyz?teacher=${teacher}")" == 200 ]] \
        || fail "/readyz?teacher=${teacher} did not answer 200"
    [[ "$info" == *"\"name\":\"${teacher}\""* ]] \
        || fail "/v1/info does not list teacher ${teacher}: $info"
done
[[ "$(http_status "/readyz?teacher=no-such-teacher")" == 404 ]] \
    || fail "/readyz?teacher=no-such-teacher did not answer 404"
log "/readyz and /v1/info answer: ${info:0:200}"

log "training both students (${STUDENT_STEPS} steps each)"
compose up -d student-a student-b
wait_exited student-a "$TRAIN_TIMEOUT"
wait_exited student-b "$TRAIN_TIMEOUT"
for service in student-a student-b; do
    log_has "$service" "trained ${STUDENT_STEPS} steps" \
        || fail "$service did not report ${STUDENT_STEPS} trained steps"
done
metrics="$(curl -sf -H "Authorization: Bearer ${TOKENBRIDGE_API_KEY}" "${BASE_URL}/metrics")" \
    || fail "/metrics with the key failed"
for teacher in math code; do
    grep -qE "^tokenbridge_teacher_tokens_total\{[^}]*teacher=\"${teacher}\"[^}]*\} [1-9]" \
        <<<"$metrics" || fail "teacher ${teacher} scored nothing for the students"
done

log "restarting student-a for one more step: it must resume from its checkpoint"
STUDENT_STEPS=3 compose up -d --no-deps student-a
wait_exited student-a "$TRAIN_TIMEOUT"
log_has student-a "resuming from" || fail "student-a did not resume from its checkpoint"
log_has student-a "trained 3 steps" || fail "student-a did not reach step 3"
