#!/bin/sh
# Keeps controller.kubernetes.io/pod-deletion-cost on each meshrt pod equal to its live sessions
# (meshrt_live_sessions on its /metrics), so that a scale-down removes the pods with the fewest
# calls first: each removed pod drains for up to MESHRT_DRAIN_S, and its calls run on meanwhile.
# docs/operations.md, Pod deletion cost, says how to pick the numbers.
#
#   NAMESPACE (default)  SELECTOR (app=meshrt,component=gateway)  PORT (8080)
#   INTERVAL  seconds between passes (30)
#   STEP      the cost is the live sessions rounded down to a multiple of this (10): a pod is
#             written to only when its cost changes, so fewer API writes for busy pods
#   ONCE=1    one pass, then exit (a CronJob, or a test)
#
# It reads /metrics through the API server's pod proxy (the image has no curl) and needs, in
# NAMESPACE: pods get/list/patch and pods/proxy get, e.g.
#   kubectl create role meshrt-deletion-cost --verb=get,list,patch --resource=pods,pods/proxy
#   kubectl create rolebinding meshrt-deletion-cost --role=meshrt-deletion-cost \
#     --serviceaccount=NAMESPACE:meshrt-deletion-cost
# and runs anywhere kubectl does: a small Deployment with that service account, or an operator's
# shell. tests/test_operator_pool.py runs it against a fake kubectl and a real node.
set -eu

NAMESPACE=${NAMESPACE:-default}
SELECTOR=${SELECTOR:-app=meshrt,component=gateway}
PORT=${PORT:-8080}
INTERVAL=${INTERVAL:-30}
STEP=${STEP:-10}
KUBECTL=${KUBECTL:-kubectl}
ANNOTATION=controller.kubernetes.io/pod-deletion-cost

while :; do
    pods=$($KUBECTL -n "$NAMESPACE" get pods -l "$SELECTOR" --field-selector=status.phase=Running \
        -o jsonpath='{.items[*].metadata.name}') || pods=""
    for pod in $pods; do
        live=$($KUBECTL -n "$NAMESPACE" get --raw "/api/v1/namespaces/$NAMESPACE/pods/$pod:$PORT/proxy/metrics" \
            2>/dev/null | awk '$1 == "meshrt_live_sessions" { print int($2) }') || live=""
        [ -n "$live" ] || continue # not answering: leave its cost as it was
        cost=$((live / STEP * STEP))
        current=$($KUBECTL -n "$NAMESPACE" get pod "$pod" \
            -o jsonpath='{.metadata.annotations.controller\.kubernetes\.io/pod-deletion-cost}' 2>/dev/null) || current=""
        if [ "$current" != "$cost" ]; then
            $KUBECTL -n "$NAMESPACE" annotate --overwrite pod "$pod" "$ANNOTATION=$cost" >/dev/null || true
        fi
    done
    [ "${ONCE:-0}" = 1 ] && break
    sleep "$INTERVAL"
done
