"""The admin routes of an Application as paths and methods, for the tests that walk them all
(the OpenAPI document's, the scope boundaries')."""

from __future__ import annotations

import re
from collections.abc import Iterator

import tornado.web
from tornado.routing import URLSpec

METHODS = ("get", "post", "put", "patch", "delete")


def templates(spec: URLSpec) -> list[str]:
    """The route's paths with each capture group as {}; a group of literal alternatives such as
    (retry|cancel) expands into one path per alternative."""
    paths = [spec.regex.pattern.rstrip("$")]
    while any("(" in path for path in paths):
        expanded = []
        for path in paths:
            match = re.search(r"\(([^)]*)\)", path)
            if match is None:
                expanded.append(path)
                continue
            group = match.group(1)
            options = group.split("|") if re.fullmatch(r"[a-z_]+(\|[a-z_]+)+", group) else ["{}"]
            expanded.extend(path[:match.start()] + option + path[match.end():] for option in options)
        paths = expanded
    return [path.replace("\\", "") for path in paths]


def vars_of(cls: type) -> set[str]:
    """Method names defined by the handler class or its wxd base classes (not RequestHandler)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass.__module__.startswith("wxd."):
            names.update(vars(klass))
    return names


def handlers(app: tornado.web.Application) -> Iterator[tuple[str, type, list[str]]]:
    """(path template with {} for each parameter, handler class, the lower-case methods it
    defines, possibly none) for every route of `app`."""
    for rule in app.wildcard_router.rules:
        if not isinstance(rule, URLSpec):
            continue
        handler = rule.target
        assert isinstance(handler, type)
        methods = [m for m in METHODS
                   if getattr(handler, m) is not getattr(handler.__mro__[-2], m, None)
                   and m in vars_of(handler)]
        for path in templates(rule):
            yield path, handler, methods


def routes(app: tornado.web.Application) -> Iterator[tuple[str, str, type]]:
    """(path template, lower-case method, handler class) for every method of every route."""
    for path, handler, methods in handlers(app):
        for method in methods:
            yield path, method, handler
