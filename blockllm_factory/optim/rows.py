"""Row-sparse gradients for the input embedding and the output head (``include_embeddings``, one process).

Autograd gives a weight its gradient whole. For the embedding and the head (vocab x hidden) that is the largest
gradient of the model, and with tied weights it is held twice over: the head's part, computed at the start of backward,
waits in autograd's input buffer until the embedding's part arrives at the end, and the two are summed into a third
tensor of the same size. At the Qwen2.5-0.5B shape (a tied 136 M-parameter embedding) that made the peak of every step
1.5 GiB higher than without the embeddings (docs/benchmarks.md, tenth round), while BlockLLM reads only a few of those
rows: the squared norm of every row block and the rows of the selected blocks.

:func:`attach_row_gradients` routes such a weight's gradient around autograd's accumulation: the modules that use it
(an ``nn.Embedding``, an ``nn.Linear`` head, or both when tied) run through the autograd functions below, which return
no gradient for the weight and hand BlockLLM what it reads instead:

* the head computes its weight gradient one chunk of rows at a time (``CHUNK_NUMEL`` coordinates), keeping each row's
  squared norm and the rows it needs: those of the selected blocks and, when tied, those of the batch's tokens;
* the embedding's part is non-zero only on the batch's token rows; it is added to the head's rows when tied (so the
  norms and the rows are those of the summed gradient), or stands alone when untied.

BlockLLM then measures every block of the tensor from the rows' squared norms and compacts the selected rows as its
hooks compact a dense gradient (same masks, same carrier). The weight is not an input of the autograd functions, so
it never gets a ``.grad`` and tensor hooks registered on it do not run. What is kept is the token rows, the selected
rows and one chunk, not vocab x hidden values. The weight keeps ``requires_grad`` as the selection sets it; where a
weight is used outside these modules, autograd's dense gradient still reaches BlockLLM's hooks and adds to the same
step.
"""

import bisect
import functools
import types
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

CHUNK_NUMEL = 1 << 22  # coordinates of the head gradient computed at once (16 MiB in fp32)


class _Link:
    """One forward's use of a tied weight: the token ids its embedding saw, and the head's part of the gradient
    waiting for the embedding's (``pending``: row squared norms, the sorted rows kept, their values)."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids.reshape(-1)
        self.pending: tuple[torch.Tensor, list[int], torch.Tensor] | None = None


class RowRoute:
    """The row-sparse gradient of one eligible embedding or head weight (``name``) of a BlockLLM optimizer."""

    def __init__(self, optimizer: Any, name: str, param: torch.nn.Parameter) -> None:
        self._optimizer = weakref.ref(optimizer)  # the model must not own the optimizer
        self.name = name
        self.param = param
        self.modules: list[tuple[torch.nn.Module, Any]] = []  # (module, its own forward, restored by detach)
        self.embedding = False
        self.head = False
        self._current: _Link | None = None  # the last embedding forward's link, not yet taken by a head forward
        self._pending: list[_Link] = []  # links holding a head part not yet finished
        # The autograd functions' stand-in for the weight: it requires grad, gets none, holds no memory worth counting.
        self.anchor = torch.zeros((), device=param.device, requires_grad=True)

    @property
    def tied(self) -> bool:
        return self.embedding and self.head

    # -------------------------------------------------------------- forward
    def embed(self, module: torch.nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        link = _Link(ids) if self.tied else None
        self._current = link
        return _RowEmbedding.apply(ids, self.anchor, self, link, module.padding_idx)

    def project(self, module: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
        link, self._current = self._current, None  # one head per embedding forward: the tied pair of a causal LM
        out = _RowHead.apply(hidden, self.anchor, self, link)
        return out if module.bias is None else out + module.bias

    # -------------------------------------------------------------- backward
    def head_backward(self, grad_out: torch.Tensor, hidden: torch.Tensor, link: _Link | None) -> None:
        owner = self._optimizer()
        if owner is None:
            return
        grad = grad_out.reshape(-1, grad_out.shape[-1])
        hidden = hidden.reshape(-1, hidden.shape[-1]).to(grad.dtype)
        rows, cols = self.param.shape
        selected = owner._selected_rows(self.name)
        keep = selected
        if link is not None:  # the token rows too, for the embedding's part
            keep = sorted(set(selected).union(link.ids.unique().tolist()))
        row_sq = torch.empty(rows, dtype=torch.float32, device=grad.device)
        values = torch.empty(len(keep), cols, dtype=self.param.dtype, device=grad.device)
        chunk = max(1, CHUNK_NUMEL // cols)
        for start in range(0, rows, chunk):
            stop = min(rows, start + chunk)
            part = (grad[:, start:stop].t() @ hidden).to(self.param.dtype)
            row_sq[start:stop] = torch.linalg.vector_norm(part, dim=1, dtype=torch.float32).square()
            first, last = bisect.bisect_left(keep, start), bisect.bisect_left(keep, stop)
            if last > first:
                index = torch.tensor(keep[first:last], dtype=torch.long, device=grad.device) - start
                values[first:last] = part.index_select(0, index)
            del part
        if link is None:
            owner._receive_rows(self.name, row_sq, values)
            return
        link.pending = (row_sq, keep, values)
        self._pending.append(link)

    def embedding_backward(self, ids: torch.Tensor, grad_out: torch.Tensor, link: _Link | None, padding_idx) -> None:
        owner = self._optimizer()
        if owner is None:
            return
        rows, cols = self.param.shape
        tokens, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
        part = torch.zeros(tokens.numel(), cols, dtype=self.param.dtype, device=grad_out.device)
        part.index_add_(0, inverse, grad_out.reshape(-1, cols).to(self.param.dtype))
        if padding_idx is not None:
            part[tokens == padding_idx] = 0  # nn.Embedding gives the padding row no gradient
        selected = owner._selected_rows(self.name)
        if link is not None and link.pending is not None:  # the head's part is waiting: add ours to its rows
            row_sq, keep, values = link.pending
            link.pending = None
            self._pending.remove(link)
            at = _positions(keep, tokens.tolist(), part.device)
            values.index_add_(0, at, part)
            row_sq[tokens] = torch.linalg.vector_norm(values.index_select(0, at), dim=1, dtype=torch.float32).square()
            if len(keep) != len(selected):
                at = _positions(keep, selected, part.device)
                values = values.index_select(0, at)
        else:  # the embedding's part alone: zero outside the batch's tokens
            row_sq = torch.zeros(rows, dtype=torch.float32, device=part.device)
            row_sq[tokens] = torch.linalg.vector_norm(part, dim=1, dtype=torch.float32).square()
            values = torch.zeros(len(selected), cols, dtype=self.param.dtype, device=part.device)
            if selected:
                where = {row: position for position, row in enumerate(selected)}
                pairs = [(where[row], index) for index, row in enumerate(tokens.tolist()) if row in where]
                if pairs:
                    into, taken = (torch.tensor(side, dtype=torch.long, device=part.device) for side in zip(*pairs))
                    values.index_copy_(0, into, part.index_select(0, taken))
        owner._receive_rows(self.name, row_sq, values)

    def flush(self) -> None:
        """Finishes head parts whose embedding part never came (a forward that fed ``inputs_embeds``, say)."""
        owner = self._optimizer()
        pending, self._pending = self._pending, []
        for link in pending:
            row_sq, keep, values = link.pending
            link.pending = None
            if owner is not None:
                selected = owner._selected_rows(self.name)
                at = _positions(keep, selected, values.device)
                owner._receive_rows(self.name, row_sq, values.index_select(0, at))

    def detach(self) -> None:
        for module, forward in self.modules:
            if forward is None:
                del module.forward
            else:
                module.forward = forward
        self.modules = []


def _positions(keep: list[int], rows: list[int], device: torch.device) -> torch.Tensor:
    """Where each of ``rows`` (all of them in ``keep``, which is sorted) sits in ``keep``."""
    return torch.tensor([bisect.bisect_left(keep, row) for row in rows], dtype=torch.long, device=device)


class _RowEmbedding(torch.autograd.Function):
    """The embedding's forward; its backward hands the route the rows. The weight is not an input: autograd never
    accumulates into it nor runs its hooks (``anchor``, a scalar that requires grad, puts the output in the graph)."""

    @staticmethod
    def forward(ctx, ids, anchor, route, link, padding_idx):
        ctx.save_for_backward(ids)
        ctx.route, ctx.link, ctx.padding_idx = route, link, padding_idx
        return F.embedding(ids, route.param, padding_idx)

    @staticmethod
    def backward(ctx, grad_out):
        (ids,) = ctx.saved_tensors
        ctx.route.embedding_backward(ids, grad_out, ctx.link, ctx.padding_idx)
        return None, None, None, None, None


class _RowHead(torch.autograd.Function):
    """The head's matmul; its backward returns the input's gradient and hands the route the weight's rows (the weight
    is not an input, as for :class:`_RowEmbedding`)."""

    @staticmethod
    def forward(ctx, hidden, anchor, route, link):
        ctx.save_for_backward(hidden)
        ctx.route, ctx.link = route, link
        return F.linear(hidden, route.param)

    @staticmethod
    def backward(ctx, grad_out):
        (hidden,) = ctx.saved_tensors
        weight = ctx.route.param
        grad_hidden = None
        if ctx.needs_input_grad[0]:
            grad_hidden = (grad_out @ weight.to(grad_out.dtype)).to(hidden.dtype)
        ctx.route.head_backward(grad_out, hidden, ctx.link)
        return grad_hidden, None, None, None


def _plain_embedding(module: torch.nn.Module) -> bool:
    return (
        type(module) is torch.nn.Embedding
        and module.max_norm is None
        and not module.scale_grad_by_freq
        and not module.sparse
    )


def _weight_users(model: torch.nn.Module) -> dict[int, list[tuple[torch.nn.Module, str]]]:
    """id(weight) -> the modules holding it as ``weight``, each with its kind: ``embedding`` (a plain
    ``nn.Embedding``), ``head`` (an ``nn.Linear``) or ``other``."""
    users: dict[int, list[tuple[torch.nn.Module, str]]] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.nn.Parameter):
            kind = "embedding" if _plain_embedding(module) else "head" if type(module) is torch.nn.Linear else "other"
            users.setdefault(id(weight), []).append((module, kind))
    return users


def _routable(uses: list[tuple[torch.nn.Module, str]]) -> bool:
    return bool(uses) and all(kind != "other" for _, kind in uses)


def _embedding_weights(
    model: torch.nn.Module, is_embedding: Callable[[str], bool]
) -> list[tuple[str, torch.nn.Parameter]]:
    return [
        (name, param)
        for name, param in model.named_parameters()
        if param.requires_grad and param.dim() == 2 and is_embedding(name)
    ]


def unserved_embeddings(model: torch.nn.Module, is_embedding: Callable[[str], bool]) -> list[str]:
    """Why a row route cannot serve ``model``'s trainable 2-D weights named as an embedding or head
    (``is_embedding``): each module of another type holding one, as ``name (Type)`` (e.g. Gemma's scaled embeddings),
    and each such weight no module holds as ``weight``, as ``name (held by no module)``. Empty when rows serve them."""
    module_names = {id(module): name for name, module in model.named_modules()}
    users = _weight_users(model)
    reasons = []
    for name, param in _embedding_weights(model, is_embedding):
        uses = users.get(id(param), [])
        if not uses:
            reasons.append(f"{name} (held by no module)")
        reasons += [
            f"{module_names[id(module)]} ({type(module).__name__})" for module, kind in uses if kind == "other"
        ]
    return reasons


def rows_serve_embeddings(model: torch.nn.Module, is_embedding: Callable[[str], bool]) -> bool:
    """Whether every trainable 2-D weight of ``model`` named as an embedding or head (``is_embedding``) is held only by
    modules a row route can serve, so that none of them would get autograd's whole gradient (there is one at least)."""
    return bool(_embedding_weights(model, is_embedding)) and not unserved_embeddings(model, is_embedding)


def attach_row_gradients(optimizer: Any, model: torch.nn.Module) -> list[str]:
    """Routes the gradients of ``optimizer``'s eligible embedding and head weights around autograd's accumulation
    (module docstring). Applies to a :class:`~blockllm_factory.optim.blockllm.BlockLLM` in one process with
    ``compact_gradients`` and row-group blocks; a weight is routed when every module of ``model`` holding it is a
    plain ``nn.Embedding`` or an ``nn.Linear``. Returns the names routed (none without ``include_embeddings``).
    :meth:`BlockLLM.detach_row_gradients` undoes it."""
    if not optimizer.row_gradients_supported():
        return []
    users = _weight_users(model)
    routed = []
    for name in optimizer.row_gradient_candidates():
        param = optimizer.param_by_name[name]
        uses = users.get(id(param), [])
        if not _routable(uses):
            continue
        route = RowRoute(optimizer, name, param)
        for module, kind in uses:
            setattr(route, kind, True)
            route.modules.append((module, module.__dict__.get("forward")))
            module.forward = _routed_forward(module, kind, route)
        optimizer._row_routes[name] = route
        routed.append(name)
    return routed


def _routed_forward(module: torch.nn.Module, kind: str, route: RowRoute) -> types.MethodType:
    """The module's new forward, bound to it, so that a copy of the module (``copy.deepcopy`` binds the copy) runs
    its own weight through its own forward rather than this one's."""
    return types.MethodType(
        functools.partial(_forward, kind=kind, route=route, own=module.__dict__.get("forward")), module
    )


def _forward(module: torch.nn.Module, input: torch.Tensor, *, kind: str, route: RowRoute, own) -> torch.Tensor:
    if not (torch.is_grad_enabled() and module.weight.requires_grad and module.weight is route.param):
        # Nothing to measure or train (autograd computes nothing for the weight), or a copy of the routed module.
        return own(input) if own is not None and module.weight is route.param else type(module).forward(module, input)
    return route.embed(module, input) if kind == "embedding" else route.project(module, input)
