"""``softmask explore``: a local web page to look at what one or two models see, word by word.

:mod:`softmask.explore.session` does the model work (no web code); :mod:`softmask.explore.app` is
the FastAPI application and the server; ``page.html`` is the page. Needs the ``explore`` extra
(``pip install 'softmask[explore]'``).
"""


def need_web_libraries() -> None:
    """Raise a ConfigError naming the extra to install when FastAPI, uvicorn or python-multipart is missing."""
    from softmask.config import ConfigError

    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401  (uploads)
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"softmask explore needs the 'explore' extra ({exc.name} is not installed): "
                          "pip install 'softmask[explore]'") from None
