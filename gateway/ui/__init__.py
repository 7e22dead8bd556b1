"""The read-only dashboard page (``index.html``: plain HTML + JS + inline SVG, no build chain, no CDN), package
data served at ``/ui`` by ``gateway/routes/ui.py``; its numbers come from ``/ui/data`` (``gateway/dashboard.py``)."""
