"""`swarm console`: the operator console in the browser.

It reads the daemon the way every other tool does: `status`, `task` and `cancel` control
requests through the producers' client, the daemon's Prometheus /metrics, and `swarm.dead`
through broker/amqp/dead_letter_box.py. It never imports Ray.

- app.py: the Starlette application, its pages and actions;
- sources.py: where the data comes from (control requests, /metrics, the dead letters);
- feed.py: the overview's history, sampled from /metrics and pushed as server-sent events;
- auth.py: the token (bearer header or login cookie) and the same-origin and form-token
  guard on actions;
- cli.py: the `swarm console` command; templates/ and static/ (uPlot vendored, no CDN).
"""
