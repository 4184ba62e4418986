"""Signature templates: Jinja2 in a sandbox, compiled once at load, rendered per sender.

Templates live in ``signatures/<tenant>/``: ``NAME.html.j2`` and optionally ``NAME.txt.j2`` (else the
text is derived from the HTML); images next to them, referenced as ``{{ image("logo.png") }}``
(embedded as a ``cid:`` part) or ``{{ image("logo.png", link=true) }}`` (``<images_base_url>/logo.png``).

Context: ``user`` (directory attributes, Entra ID names), ``recipient`` (address, internal),
``message`` (subject, date, kind) and ``tenant`` (name, domains). A missing attribute renders as
nothing, never "None"; a template line whose placeholders all rendered empty is removed — the
"remove text if empty" behaviour signature admins rely on.
"""

from __future__ import annotations

import html as htmllib
import mimetypes
import re
from collections.abc import Mapping
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Final

import jinja2
import jinja2.meta
import jinja2.nodes
from jinja2.sandbox import SandboxedEnvironment

from relay.memo import Memo
from relay.textfile import read_utf8
from relay.values import Image, Signature

CONTEXT_NAMES: Final = frozenset({"user", "recipient", "message", "tenant", "image"})
_EMPTY: Final = "\x00\x01e\x00"
_FULL: Final = "\x00\x01f\x00"


class RenderError(Exception):
    """A template misbehaved at render time (sandbox violation...): pass the message through."""


# A signature is a few KB; these bounds keep a template (or a message value it repeats) from
# growing a message without limit. Rendering stops as soon as the output passes the bound.
MAX_RENDERED_CHARS: Final = 256 * 1024
_MAX_REPEAT: Final = 64 * 1024  # longest string or list a "*" or "**" in a template may build


def _bounded(template: jinja2.Template, ctx: Mapping[str, Any], where: Path) -> str:
    out: list[str] = []
    size = 0
    for chunk in template.generate(ctx):
        size += len(chunk)
        if size > MAX_RENDERED_CHARS:
            raise RenderError(f"{where}: rendered output over {MAX_RENDERED_CHARS} characters")
        out.append(chunk)
    return "".join(out)


def _finalize(value: Any) -> Any:
    if value is None or isinstance(value, jinja2.Undefined) or (isinstance(value, str) and not value.strip()):
        return _EMPTY
    return _FULL + value if isinstance(value, str) else _FULL + str(value)


def _drop_empty_lines(text: str) -> str:
    lines = [ln for ln in text.split("\n") if not (_EMPTY in ln and _FULL not in ln)]
    return "\n".join(lines).replace(_EMPTY, "").replace(_FULL, "")


class _StrictSandbox(SandboxedEnvironment):
    """Jinja's sandbox turns a forbidden attribute (``__class__``, ``__globals__``...) into an
    undefined value that renders as nothing; we make it an error, so an escape attempt is seen,
    logged and the message passed through instead of silently stamped."""

    # "*" and "**" are checked before they run ("a" * 10**8 would allocate 100 MB first); this
    # also stops Jinja from constant-folding them at compile time.
    intercepted_binops = frozenset({"*", "**"})

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise jinja2.exceptions.SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__} is unsafe")

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(n, int) and hasattr(seq, "__len__") and len(seq) * n > _MAX_REPEAT:
                raise jinja2.exceptions.SecurityError(f"'*' would build {len(seq) * n} items (max {_MAX_REPEAT})")
        if operator == "**" and isinstance(right, int | float) and abs(right) > 64:
            raise jinja2.exceptions.SecurityError(f"'**' exponent {right} too large (max 64)")
        return super().call_binop(context, operator, left, right)


def _env(autoescape: bool) -> SandboxedEnvironment:
    return _StrictSandbox(
        autoescape=autoescape, undefined=jinja2.ChainableUndefined, finalize=_finalize,
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False,
    )


_SPACES: Final = re.compile(r"\s+")
_BLANK_LINES: Final = re.compile(r"\n{3,}")


class _TextFromHtml(HTMLParser):
    _BLOCK: Final = {"p", "div", "tr", "table", "li", "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol"}

    def updatepos(self, _i: int, j: int) -> int:
        # The base class counts the line breaks of every token it passes, for getpos(), which
        # nothing here calls. With the expressions compiled once, html_to_text of a message's HTML
        # (keyword rules read it) takes 0.80-0.87 of the time it took (tests/unit/test_html_to_text.py).
        return j

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skip = 0
        self.at_line_start = True

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("style", "script", "head"):
            self.skip += 1
        elif tag == "br":
            self.out.append("\n")
            self.at_line_start = True
        elif tag in self._BLOCK:
            self._block_break()
        elif tag == "td":
            self.out.append(" ")
        elif tag == "img":
            alt = dict(attrs).get("alt")
            if alt:
                self.out.append(alt)
                self.at_line_start = False

    def handle_endtag(self, tag: str) -> None:
        if tag in ("style", "script", "head"):
            self.skip = max(0, self.skip - 1)
        elif tag in self._BLOCK:
            self._block_break()

    def _block_break(self) -> None:
        # Adjacent block boundaries (</td></tr><tr>) make one line break, not a blank line.
        if self.out and not self.at_line_start:
            self.out.append("\n")
            self.at_line_start = True

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.out.append(_SPACES.sub(" ", data))
            if data.strip():
                self.at_line_start = False


def html_to_text(html: str) -> str:
    """A readable plain-text rendition of a signature's HTML (for templates without .txt.j2)."""
    return _text_of(_TextFromHtml(), html)


def _text_of(p: _TextFromHtml, html: str) -> str:
    """What parser ``p`` makes of ``html``, its lines tidied (a test runs it with html.parser's
    own bookkeeping put back)."""
    p.feed(html)
    p.close()
    lines = [ln.strip() for ln in "".join(p.out).split("\n")]
    text = _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip("\n")
    return htmllib.unescape(text) + "\n"


@dataclass(frozen=True)
class Template:
    name: str
    html: jinja2.Template
    text: jinja2.Template | None
    images: frozenset[str]
    uses: frozenset[str] = frozenset()  # context names the template reads (for the render cache)


class Templates:
    """Every template of one tenant, compiled at load; all errors collected with file and line."""

    def __init__(self, sig_dir: Path, images_base_url: str = "") -> None:
        """An empty set for ``sig_dir``; :meth:`load` reads and compiles the files."""
        self.dir = sig_dir
        self.base_url = images_base_url.rstrip("/")
        self.templates: dict[str, Template] = {}
        self.image_data: dict[str, bytes] = {}
        self._cache: Memo[tuple[str, ...], Signature] = Memo(50_000)  # shared by worker threads
        self.names: frozenset[str] = frozenset()
        self.errors: list[str] = []

    @classmethod
    def load(cls, sig_dir: Path, images_base_url: str = "") -> Templates:
        """Every template of ``sig_dir`` compiled once; errors (file and line) collected in ``errors``."""
        t = cls(sig_dir, images_base_url)
        t._read_all()
        return t

    def _read_all(self) -> None:
        sig_dir = self.dir
        # Every template file present, compiled or not: rules are checked against these names, so
        # one broken template is one error, not one more per rule that uses it.
        self.names = frozenset(f.name.removesuffix(".html.j2") for f in sig_dir.glob("*.html.j2")) \
            if sig_dir.is_dir() else frozenset()
        errors: list[str] = []
        html_env, text_env = _env(True), _env(False)
        for f in sorted(sig_dir.glob("*.html.j2")) if sig_dir.is_dir() else []:
            name = f.name.removesuffix(".html.j2")
            tf = sig_dir / f"{name}.txt.j2"
            html = self._load(html_env, f, errors)
            text = self._load(text_env, tf, errors) if tf.exists() else None
            if html is not None and (text is not None or not tf.exists()):
                self.templates[name] = Template(
                    name, html[0], text[0] if text else None, html[2] | (text[2] if text else frozenset()),
                    html[1] | (text[1] if text else frozenset()))
        for f in sorted(sig_dir.glob("*.txt.j2")) if sig_dir.is_dir() else []:
            if not (sig_dir / f.name.replace(".txt.j2", ".html.j2")).exists():
                errors.append(f"{f}: a text template needs its HTML sibling {f.name.replace('.txt.j2', '.html.j2')}")
        # Kept, not raised: rules referring to the templates that did compile can still be checked,
        # so `signature-relay check` reports real errors instead of a cascade.
        self.errors = errors

    def _load(self, env: SandboxedEnvironment, f: Path, errors: list[str]
              ) -> tuple[jinja2.Template, frozenset[str], frozenset[str]] | None:
        """Read and parse one template once: (compiled, context names it reads, images it embeds),
        or None with its errors (file and line) appended."""
        src = read_utf8(f, errors)
        if src is None:
            return None
        try:
            ast = env.parse(src, name=f.name, filename=str(f))
            # Unknown filters only show when the code is generated: compile inside the same try.
            compiled = env.from_string(src, template_class=jinja2.Template)
        except jinja2.TemplateSyntaxError as e:  # includes unknown filters (TemplateAssertionError)
            errors.append(f"{f}:{e.lineno}: {e.message}")
            return None
        uses = frozenset(jinja2.meta.find_undeclared_variables(ast))
        unknown = uses - CONTEXT_NAMES
        for var in sorted(unknown):
            word = re.compile(rf"\b{re.escape(var)}\b")
            line = next((i for i, ln in enumerate(src.splitlines(), 1) if word.search(ln)), 0)
            errors.append(f"{f}:{line}: unknown variable {var!r} (use user, recipient, message, tenant, image)")
        n = len(errors)
        images = self._images(ast, f, errors)
        if unknown or len(errors) > n:
            return None
        return compiled, uses, images

    def _images(self, ast: jinja2.nodes.Template, f: Path, errors: list[str]) -> frozenset[str]:
        out: set[str] = set()
        for call in ast.find_all(jinja2.nodes.Call):
            if isinstance(call.node, jinja2.nodes.Name) and call.node.name == "image":
                arg = call.args[0] if call.args else None
                if not isinstance(arg, jinja2.nodes.Const) or not isinstance(arg.value, str):
                    errors.append(f"{f}:{call.lineno}: image() takes a literal file name")
                    continue
                path = self.dir / arg.value
                if not path.is_file() or path.resolve().parent != self.dir.resolve():
                    errors.append(f"{f}:{call.lineno}: image {arg.value!r} not found in {self.dir}")
                    continue
                self.image_data[arg.value] = path.read_bytes()
                out.add(arg.value)
        return frozenset(out)

    def render(self, name: str, context: Mapping[str, Any]) -> Signature:
        """Render ``name``. Rendering is a pure function of the context parts the template reads,
        so results are memoised on exactly those (typically the sender's attributes)."""
        t = self.templates[name]
        key = (name, *(repr(sorted(context[k].items())) if isinstance(context.get(k), dict) else repr(context.get(k))
                       for k in sorted(t.uses - {"image"})))
        return self._cache.get_or_compute(key, lambda: self._render(t, context))

    def _render(self, t: Template, context: Mapping[str, Any]) -> Signature:
        name = t.name
        used: set[str] = set()

        def image(file: str, link: bool = False) -> str:
            if link and self.base_url:
                return f"{self.base_url}/{file}"
            used.add(file)
            return f"cid:{file}"

        ctx = {**context, "image": image}
        where = self.dir / f"{name}.html.j2"
        try:
            html = _drop_empty_lines(_bounded(t.html, ctx, where))
            text = _drop_empty_lines(_bounded(t.text, ctx, self.dir / f"{name}.txt.j2")) if t.text is not None \
                else html_to_text(html)
        except RenderError:
            raise
        except jinja2.exceptions.SecurityError as e:
            raise RenderError(f"{where}: template {name}: sandbox violation: {e}") from e
        except Exception as e:
            # Any failure — RecursionError from a recursive macro, TypeError, a bug in a filter —
            # is a render failure: the message passes through unstamped, never a 451 that would
            # repeat on every retry (issue #10, finding 8).
            raise RenderError(f"{where}: template {name}: {type(e).__name__}: {e}") from e
        images = tuple(Image(f, mimetypes.guess_type(f)[0] or "application/octet-stream", self.image_data[f])
                       for f in sorted(used) if f in self.image_data)
        return Signature(html=html.strip("\n") + "\n", text=text, images=images)
