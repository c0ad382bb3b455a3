"""The hub's web page: a small single-page app served by ``loradex serve`` at ``/``.

* ``routes.py``: the page's shell and its static assets (open, like ``/health``);
* ``api_routes.py``: the few JSON routes the page adds to the hub API (review rounds
  in the browser, file sizes), behind the API key like every data route;
* ``static/``: hand-written HTML, CSS and ES modules; no build step, nothing loaded
  from the internet. See docs/web.md.
"""
