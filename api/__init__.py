"""carcert REST API (FastAPI). Entry point: api.main.create_app(settings=None).

    uvicorn --factory api.main:create_app --workers 1      (or `carcert serve`)

Modules: main (app factory, OpenAPI), errors (RFC 9457 problem+json), auth (bearer keys, cached),
deps (per-app session/settings/store), checks (upload and job-spec checks), uploads (streamed
multipart), fastpath (cached certificate answers), metrics (Prometheus), schemas (response
models), routers/{artifacts,jobs,health}.
"""
