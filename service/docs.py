"""The interactive API docs at /docs, with Swagger UI served from this server: an air-gapped cluster has no CDN.

FastAPI's own /docs loads Swagger UI from cdn.jsdelivr.net and its /redoc from jsDelivr and Google Fonts,
so behind a firewall both pages are blank. Here /docs is FastAPI's page pointed at the files of the
installed package swagger-ui-bundle-v2 (Swagger UI 5, which reads the OpenAPI 3.1 that FastAPI writes),
mounted at /docs/assets; FastAPI's CDN pages are switched off in service.app. The server's root
redirects to /docs: BentoML's own index page there loads Google Tag Manager from the internet.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

DOCS = "/docs"
ASSETS = "/docs/assets"


def install(app: FastAPI) -> None:
    """Serve /docs and its assets from `app` (made with docs_url=None and redoc_url=None), and / as a redirect there."""
    app.mount(ASSETS, StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    @app.get("/", include_in_schema=False)
    def index() -> RedirectResponse:
        return RedirectResponse(DOCS)

    @app.get(DOCS, include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} - API docs",
                                   swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{ASSETS}/favicon-32x32.png")
