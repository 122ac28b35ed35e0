"""The console at /ui: a page served from files inside the package (`static/`), no build step,
no JavaScript library, nothing fetched from outside the server at run time (DESIGN §11).

`routes.ui_router()` serves it. The page's own files are public, so the page can load and then
ask for the API key; every API call it makes sends the key as a Bearer token.
"""
