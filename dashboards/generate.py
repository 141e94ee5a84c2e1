#!/usr/bin/env python3
"""Writes grafana/overview.json and grafana/nodes.json. Run from this directory after changing a panel:
`python3 generate.py`. Metric names must be those of docs/metrics.md (a test checks both ways)."""
import json
DS = {"type": "prometheus", "uid": "prometheus"}
def var(name, query):
    return {"name": name, "label": name, "type": "query", "datasource": DS, "query": {"query": query, "refId": name},
            "definition": query, "includeAll": True, "multi": True, "allValue": ".+", "refresh": 2,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]}}
class D:
    def __init__(self): self.panels=[]; self.y=0; self.x=0; self.id=1
    def panel(self, title, targets, kind="timeseries", w=8, h=7, unit=None, desc=""):
        if self.x + w > 24: self.x = 0; self.y += h
        p = {"id": self.id, "type": kind, "title": title, "description": desc, "datasource": DS,
             "gridPos": {"x": self.x, "y": self.y, "w": w, "h": h},
             "targets": [{"refId": chr(65+i), "expr": e, "legendFormat": l, "datasource": DS} for i,(e,l) in enumerate(targets)],
             "fieldConfig": {"defaults": {"unit": unit or "short"}, "overrides": []}, "options": {}}
        self.panels.append(p); self.id += 1; self.x += w
    def row(self, title):
        self.x = 0; self.y += 7
        self.panels.append({"id": self.id, "type": "row", "title": title, "collapsed": False, "gridPos": {"x":0,"y":self.y,"w":24,"h":1}, "panels": []})
        self.id += 1; self.y += 1
def dash(uid, title, d, variables, desc):
    return {"uid": uid, "title": title, "description": desc, "tags": ["fleetq"], "timezone": "browser", "schemaVersion": 39,
            "version": 1, "editable": True, "refresh": "10s", "time": {"from": "now-1h", "to": "now"},
            "templating": {"list": variables}, "annotations": {"list": []}, "panels": d.panels}
def sel(*parts): return "{" + ", ".join(parts) + "}"
Q='queue=~"$queue"'; N='node=~"$node"'; OK='outcome="succeeded"'; FAIL='outcome="failed"'
RI='[$__rate_interval]'
o = D()
o.row("Queues")
o.panel("Waiting", [(f'sum by (queue) (fleetq_queue_waiting{sel(Q)})', "{{queue}}")], desc="Jobs waiting for a worker.")
o.panel("In flight", [(f'sum by (queue) (fleetq_queue_in_flight{sel(Q)})', "{{queue}}")], desc="Jobs delivered to a worker and not finished.")
o.panel("Delayed and dead", [(f'sum by (queue) (fleetq_queue_delayed{sel(Q)})', "{{queue}} delayed"), (f'sum by (queue) (fleetq_queue_dead{sel(Q)})', "{{queue}} dead")], desc="Retries in backoff, scheduled jobs, and dead letters.")
o.panel("Oldest waiting job", [(f'max by (queue) (fleetq_queue_oldest_waiting_seconds{sel(Q)})', "{{queue}}")], unit="s")
o.panel("Enqueue and completion rate", [(f'sum by (queue) (rate(fleetq_queue_enqueued_total{sel(Q)}{RI}))', "{{queue}} enqueued"), (f'sum by (queue) (rate(fleetq_queue_jobs_total{sel(Q, OK)}{RI}))', "{{queue}} succeeded")], unit="reqps")
o.panel("Consumers", [(f'sum by (queue) (fleetq_queue_consumers{sel(Q)})', "{{queue}}")], desc="Worker processes in the consumer group.")
o.row("Latency")
o.panel("Wait time (enqueue → start) p50 / p95 / p99", [(f'histogram_quantile({q}, sum by (le, queue) (rate(fleetq_job_wait_seconds_bucket{sel(Q)}{RI})))', f"{{{{queue}}}} p{int(q*100)}") for q in (0.5, 0.95, 0.99)], w=12, unit="s")
o.panel("Run time p50 / p95 / p99", [(f'histogram_quantile({q}, sum by (le, queue) (rate(fleetq_job_run_seconds_bucket{sel(Q)}{RI})))', f"{{{{queue}}}} p{int(q*100)}") for q in (0.5, 0.95, 0.99)], w=12, unit="s")
o.panel("Mean wait and run time", [(f'sum by (queue) (rate(fleetq_job_wait_seconds_sum{sel(Q)}{RI})) / sum by (queue) (rate(fleetq_job_wait_seconds_count{sel(Q)}{RI}))', "{{queue}} wait"), (f'sum by (queue) (rate(fleetq_job_run_seconds_sum{sel(Q)}{RI})) / sum by (queue) (rate(fleetq_job_run_seconds_count{sel(Q)}{RI}))', "{{queue}} run")], w=24, unit="s")
o.row("Outcomes and failures")
o.panel("Outcomes", [(f'sum by (queue, outcome) (rate(fleetq_queue_jobs_total{sel(Q)}{RI}))', "{{queue}} {{outcome}}")], unit="reqps")
o.panel("Timeouts by kind", [(f'sum by (queue, kind) (rate(fleetq_queue_timeouts_total{sel(Q)}{RI}))', "{{queue}} {{kind}}")], unit="reqps")
o.panel("Reclaims and fenced commits", [(f'sum by (queue) (rate(fleetq_queue_reclaimed_total{sel(Q)}{RI}))', "{{queue}} reclaimed"), (f'sum by (queue) (rate(fleetq_queue_fenced_total{sel(Q)}{RI}))', "{{queue}} fenced")], unit="reqps", desc="Reclaims: a host's lease ran out. Fenced: a host that lost its lease tried to commit.")
overview = dash("fleetq-overview", "fleetq — overview", o, [var("queue", "label_values(fleetq_queue_waiting, queue)")], "Queue depth, wait and run time, outcomes, timeouts, reclaims, fenced commits.")

n = D()
n.row("Fleet")
n.panel("Nodes by state", [('sum by (state) (fleetq_nodes)', "{{state}}")], desc="Live nodes: live or suspended.")
n.panel("Busy / slots", [(f'sum by (node) (fleetq_node_busy_slots{sel(N)})', "{{node}} busy"), (f'sum by (node) (fleetq_node_slots{sel(N)})', "{{node}} slots")], desc="From the node records (broker).")
n.panel("Last seen", [(f'max by (node) (fleetq_node_heartbeat_age_seconds{sel(N)})', "{{node}}")], unit="s", desc="Time since each node's last heartbeat.")
n.row("Per node, from Redis (broker)")
n.panel("Completions", [(f'sum by (node) (rate(fleetq_queue_node_jobs_total{sel(Q, N, OK)}{RI}))', "{{node}}")], unit="reqps")
n.panel("Failures", [(f'sum by (node) (rate(fleetq_queue_node_jobs_total{sel(Q, N, FAIL)}{RI}))', "{{node}}")], unit="reqps")
n.panel("Timeouts by kind", [(f'sum by (node, kind) (rate(fleetq_queue_node_timeouts_total{sel(Q, N)}{RI}))', "{{node}} {{kind}}")], unit="reqps", desc="Lease timeouts included: counted when another node reclaims.")
n.row("Per worker (its own /metrics)")
n.panel("Suspended", [(f'max by (node) (fleetq_node_suspended{sel(Q, N)})', "{{node}}")], desc="1 while the node takes no new jobs.")
n.panel("Worker busy / slots", [(f'sum by (node) (fleetq_worker_busy_slots{sel(Q, N)})', "{{node}} busy"), (f'sum by (node) (fleetq_worker_slots{sel(Q, N)})', "{{node}} slots")])
n.panel("Outcomes", [(f'sum by (node, outcome) (rate(fleetq_jobs_total{sel(Q, N)}{RI}))', "{{node}} {{outcome}}")], unit="reqps")
n.panel("Timeouts", [(f'sum by (node, kind) (rate(fleetq_job_timeouts_total{sel(Q, N)}{RI}))', "{{node}} {{kind}}")], unit="reqps")
n.panel("Reclaimed and fenced", [(f'sum by (node) (rate(fleetq_jobs_reclaimed_total{sel(Q, N)}{RI}))', "{{node}} reclaimed"), (f'sum by (node) (rate(fleetq_commits_fenced_total{sel(Q, N)}{RI}))', "{{node}} fenced")], unit="reqps")
n.panel("Wait time p95 by node", [(f'histogram_quantile(0.95, sum by (le, node) (rate(fleetq_job_wait_seconds_bucket{sel(Q, N)}{RI})))', "{{node}}")], unit="s")
nodes = dash("fleetq-nodes", "fleetq — nodes", n, [var("queue", "label_values(fleetq_queue_waiting, queue)"), var("node", "label_values(fleetq_node_slots, node)")], "Per node: busy slots, completions, failures, timeouts by kind, suspension, last seen.")
json.dump(overview, open("grafana/overview.json","w"), indent=2); json.dump(nodes, open("grafana/nodes.json","w"), indent=2)
print(len(o.panels), len(n.panels))
