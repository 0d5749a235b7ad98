"""`meshrt bench`: what the gateway costs, each figure measured against a direct connection to
the same upstream simulator in the same run.

The harness starts its own upstream simulator and its own `meshrt serve` (temporary state
directory, SQLite, loopback only), creates an account and a key, and measures:

1. `measure_rtt` — added round-trip latency. Two connections in echo mode (`sim_echo=1`): one
   straight to the simulator, one through a gateway session. Each round sends the same frame on
   both, alternating which goes first, and times sendall → whole echoed frame received. Sizes:
   a 1 KB text event and a 32 KB `input_audio_buffer.append`-shaped event. Added = gateway
   percentile minus direct percentile; ratio = gateway / direct.
2. `measure_setup` — added connection set-up: TCP connect → 101 → `session.created` received.
   Sequential (one at a time, closed before the next, direct and gateway alternating) and in
   bursts of 100 concurrent opens (per-connection times and the burst's wall time).
3. `measure_memory` — USS and PSS (psutil `memory_full_info`) of every session's worker (the
   pid the gateway records for a live session) with M sessions idle, then the per-worker
   maximum over samples while they stream audio (below); USS/PSS of the supervisor, the front
   door, the zygote and any pre-forked worker still waiting for a session.
4. `measure_capacity` — a ramp of concurrent sessions, each sending 20 ms PCM16 24 kHz chunks
   (960 bytes → 1,280 base64 chars) as `input_audio_buffer.append` 50 times a second and a
   `response.create` every 3 s, receiving the simulator's deltas at its real pace
   (`sim_pace=1`, 1 s responses). The load runs in separate load-generator processes. While
   it runs, the measuring process probes echo round trips (1 KB) on a direct and a gateway
   connection, interleaved; a step passes when the probes' p99 added latency is under 5 ms,
   the direct probe's own p99 is too (else the box is saturated), every session is still
   open and the load generator kept up (≥ 95 % of 50 appends/s). CPU per session =
   Δ CPU time of supervisor + front door + zygote + workers / sessions / wall.
5. `measure_throughput` — one session, one way: 32 KB `input_audio_buffer.append` messages
   written as fast as the socket takes them, then `input_audio_buffer.clear`; the clock stops
   at `input_audio_buffer.cleared`, so every byte has crossed the relay. Direct and gateway
   rounds alternate.

Clients are deliberately lean so that they add the same small cost to both paths: blocking
sockets speaking raw RFC 6455 frames (pre-masked frames built once, no event loop in the timed
path) for 1, 2 (sequential) and 5; asyncio Protocols (uvloop when installed) for bursts and for
the load generator. Everything shares this machine's CPUs: the simulator and the load generator
compete with the gateway, so capacity is a lower bound; CPU per session is the portable figure.

Plans: full (default), `--quick` (< 60 s), and MESHRT_BENCH_SMOKE=1 (tiny counts, for tests).
MESHRT_BENCH_ONLY=rtt,setup,memory,throughput,capacity runs a subset; MESHRT_BENCH_PROFILE=DIR
records py-spy profiles while measuring (see `Profiler`). Progress goes to stderr; the table
(or with `meshrt --json bench` the JSON document) to stdout; `--out FILE` writes the JSON too.

The modules: `run` (`run_bench`, the entry), `plans`, `stack` (the processes under test),
`clients` (frames, targets and the two clients), `loadgen`, one module per measurement (`rtt`,
`setup_time`, `memory`, `capacity`, `throughput`), `stats`, `machine`, `profiles` and `report`;
`floor` is the byte-copying relay the round trips are also compared with.
"""
