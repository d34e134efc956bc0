"""Surface ``llamafactory.webui.locales``: labels of the BlockLLM panel in every language the web UI ships.

LLaMA-Factory's ``Engine.change_lang`` relabels every registered element whose name is a key of ``LOCALES``, at page
load and on each language switch; adding the panel's names here is all it takes. The entries are added to the dict in
place (``runner.py`` and ``engine.py`` import the same object) and never replace an existing key.
"""

from ._version import check_llamafactory_version

PAPER = "[BlockLLM](https://arxiv.org/abs/2406.17296)"

# Element name (as registered under ``train.``) -> language -> gradio properties, like LLaMA-Factory's own entries.
BLOCKLLM_LOCALES: dict[str, dict[str, dict[str, str]]] = {
    "blockllm_tab": {
        "en": {"label": "BlockLLM configurations"},
        "ru": {"label": "Конфигурации BlockLLM"},
        "zh": {"label": "BlockLLM 参数设置"},
        "ko": {"label": "BlockLLM 설정"},
        "ja": {"label": "BlockLLM 設定"},
    },
    "use_blockllm": {
        "en": {"label": "Use BlockLLM", "info": f"Use the {PAPER} optimizer (finetuning method blockllm)."},
        "ru": {
            "label": "Использовать BlockLLM",
            "info": f"Используйте оптимизатор {PAPER} (метод дообучения blockllm).",
        },
        "zh": {"label": "使用 BlockLLM", "info": f"使用 {PAPER} 优化器（微调方法 blockllm）。"},
        "ko": {"label": "BlockLLM 사용", "info": f"{PAPER} 옵티마이저를 사용합니다(파인튜닝 방법 blockllm)."},
        "ja": {
            "label": "BlockLLM を使用",
            "info": f"{PAPER} オプティマイザーを使用します（ファインチューニング方法 blockllm）。",
        },
    },
    "blockllm_sparsity": {
        "en": {"label": "Sparsity", "info": "Share of the parameters left unchanged at each step, in [0, 1)."},
        "ru": {"label": "Разреженность", "info": "Доля параметров, не изменяемых на каждом шаге, в [0, 1)."},
        "zh": {"label": "稀疏度", "info": "每步保持不变的参数比例，取值范围 [0, 1)。"},
        "ko": {"label": "희소성", "info": "각 스텝에서 변경되지 않는 파라미터의 비율, [0, 1)."},
        "ja": {"label": "スパース率", "info": "各ステップで更新しないパラメータの割合、[0, 1)。"},
    },
    "blockllm_patience": {
        "en": {
            "label": "Patience",
            "info": "Steps of loss history that decide when blocks are reselected; a number in (0, 1) is that share "
            "of the run's steps.",
        },
        "ru": {
            "label": "Терпение",
            "info": "Число шагов истории потерь, по которому решается повторный выбор блоков; число в (0, 1) — "
            "такая доля шагов обучения.",
        },
        "zh": {
            "label": "耐心步数",
            "info": "决定何时重新选择参数块的损失历史步数；(0, 1) 之间的数表示占训练总步数的比例。",
        },
        "ko": {
            "label": "인내 스텝",
            "info": "블록 재선택 시점을 결정하는 손실 기록 스텝 수. (0, 1) 사이의 수는 전체 학습 스텝에 대한 비율.",
        },
        "ja": {
            "label": "ペイシェンス",
            "info": "ブロックを選び直す時期を決める損失履歴のステップ数。"
            "(0, 1) の数は学習全体のステップに対する割合。",
        },
    },
    "blockllm_probe": {
        "en": {"label": "Probe", "info": "How the gradients of unselected blocks are measured."},
        "ru": {"label": "Зондирование", "info": "Как измеряются градиенты невыбранных блоков."},
        "zh": {"label": "探测方式", "info": "未选中参数块梯度的测量方式。"},
        "ko": {"label": "프로브 방식", "info": "선택되지 않은 블록의 그래디언트 측정 방식."},
        "ja": {"label": "プローブ方式", "info": "未選択ブロックの勾配の測り方。"},
    },
    "blockllm_probe_blocks": {
        "en": {"label": "Probe blocks", "info": "Unselected blocks probed per step (sample probe)."},
        "ru": {"label": "Блоков для зондирования", "info": "Невыбранных блоков, зондируемых за шаг (режим sample)."},
        "zh": {"label": "探测块数", "info": "每步探测的未选中参数块数量（sample 方式）。"},
        "ko": {"label": "프로브 블록 수", "info": "스텝마다 측정하는 미선택 블록 수(sample 방식)."},
        "ja": {"label": "プローブブロック数", "info": "各ステップで測る未選択ブロックの数（sample 方式）。"},
    },
    "blockllm_include_embeddings": {
        "en": {
            "label": "Include embeddings",
            "info": "Also train the embeddings and the output head: auto (default: in one process), true, false.",
        },
        "ru": {
            "label": "Включать эмбеддинги",
            "info": "Обучать также эмбеддинги и выходной слой: auto (по умолчанию: в одном процессе), true, false.",
        },
        "zh": {"label": "包含词嵌入", "info": "同时训练输入词嵌入层和输出层：auto（默认：单进程时是）、true、false。"},
        "ko": {
            "label": "임베딩 포함",
            "info": "입력 임베딩과 출력 헤드도 학습합니다: auto(기본값: 단일 프로세스에서 예), true, false.",
        },
        "ja": {
            "label": "埋め込みを含める",
            "info": "入力埋め込みと出力ヘッドも学習します：auto（既定：単一プロセスでは有効）、true、false。",
        },
    },
    "blockllm_score": {
        "en": {"label": "Ranking score", "info": "norm_per_sqrt_size (default, measured better) or norm (the paper)."},
        "ru": {
            "label": "Оценка блоков",
            "info": "norm_per_sqrt_size (по умолчанию, лучше) или norm (статья).",
        },
        "zh": {"label": "排序分数", "info": "norm_per_sqrt_size（默认，实测更好）或 norm（论文）。"},
        "ko": {"label": "순위 점수", "info": "norm_per_sqrt_size(기본값, 측정상 더 좋음) 또는 norm(논문)."},
        "ja": {"label": "順位スコア", "info": "norm_per_sqrt_size（既定、実測で良好）または norm（論文）。"},
    },
    "blockllm_block_size": {
        "en": {
            "label": "Block size",
            "info": "head (default: one attention head), N coordinates or 0 (whole tensors, paper).",
        },
        "ru": {
            "label": "Размер блока",
            "info": "head (по умолчанию: голова внимания), N координат или 0 (тензоры, статья).",
        },
        "zh": {"label": "块大小", "info": "head（默认：一个注意力头）、N 个坐标，或 0（整个张量，论文）。"},
        "ko": {"label": "블록 크기", "info": "head(기본값: 어텐션 헤드 하나), N개 좌표, 또는 0(텐서 전체, 논문)."},
        "ja": {
            "label": "ブロックサイズ",
            "info": "head（既定: 注意ヘッド 1 つ）、N 座標、0（テンソル全体、論文）。",
        },
    },
    "blockllm_norms": {
        "en": {
            "label": "Norms",
            "info": "select (default: ranked like other blocks), always (in every selection) or frozen.",
        },
        "ru": {
            "label": "Нормализации",
            "info": "select (по умолчанию: как другие блоки), always (в каждом выборе) или frozen (заморожены).",
        },
        "zh": {
            "label": "归一化层",
            "info": "select（默认：与其他块一样排序选择）、always（每次都选中）或 frozen（冻结）。",
        },
        "ko": {
            "label": "정규화 층",
            "info": "select(기본값: 다른 블록처럼 선택), always(매번 선택) 또는 frozen(고정).",
        },
        "ja": {
            "label": "正規化層",
            "info": "select（既定: 他のブロックと同様に選択）、always（常に選択）、frozen（凍結）。",
        },
    },
    "blockllm_coverage": {
        "en": {
            "label": "Coverage",
            "info": "auto (default): 4 with row blocks, 1 with whole tensors; 1 (paper): blocks fill the budget; "
            "c > 1: c times the blocks, top 1/c each.",
        },
        "ru": {
            "label": "Охват",
            "info": "auto (по умолчанию): 4 для блоков строк, 1 для целых тензоров; 1 (статья): блоки до бюджета; "
            "c > 1: в c раз больше блоков, лучшие 1/c.",
        },
        "zh": {
            "label": "覆盖倍数",
            "info": "auto（默认）：行块时为 4，整张量时为 1；1（论文）：块填满预算；c > 1：c 倍的块，每块保留前 1/c。",
        },
        "ko": {
            "label": "커버리지",
            "info": "auto(기본값): 행 블록이면 4, 전체 텐서면 1; 1(논문): 예산만큼 블록; "
            "c > 1: c배 블록, 각 상위 1/c.",
        },
        "ja": {
            "label": "カバレッジ",
            "info": "auto（既定）: 行ブロックなら 4、テンソル全体なら 1。1（論文）: 予算分のブロック。"
            "c > 1: c 倍のブロック、各上位 1/c。",
        },
    },
    "blockllm_reselect_warmup": {
        "en": {
            "label": "Warm-up after reselection",
            "info": "0 (default, paper): none; W: a new selection's rate ramps up over its first W steps.",
        },
        "ru": {
            "label": "Разогрев после перевыбора",
            "info": "0 (по умолчанию, статья): нет; W: темп нового выбора растёт за первые W шагов.",
        },
        "zh": {"label": "重选后预热", "info": "0（默认，论文）：无；W：新选择的学习率在前 W 步线性升高。"},
        "ko": {
            "label": "재선택 후 워밍업",
            "info": "0(기본값, 논문): 없음; W: 새 선택의 학습률이 처음 W 스텝 동안 증가.",
        },
        "ja": {
            "label": "再選択後のウォームアップ",
            "info": "0（既定、論文）: なし。W: 新しい選択の学習率を最初の W ステップで上げる。",
        },
    },
    "blockllm_reselect_until": {
        "en": {
            "label": "Reselect until",
            "info": "0 (default, paper): no limit; N: last step that may reselect; 0.75: not in the last quarter.",
        },
        "ru": {
            "label": "Перевыбор до",
            "info": "0 (по умолч., статья): без предела; N: последний шаг перевыбора; 0.75: не в последней четверти.",
        },
        "zh": {"label": "重选截止", "info": "0（默认，论文）：不限；N：最后可重选的步；0.75：最后四分之一不重选。"},
        "ko": {
            "label": "재선택 마감",
            "info": "0(기본값, 논문): 제한 없음; N: 재선택 가능한 마지막 스텝; 0.75: 마지막 1/4 제외.",
        },
        "ja": {
            "label": "再選択の期限",
            "info": "0（既定、論文）: 無制限。N: 再選択できる最後のステップ。0.75: 最後の四分の一は再選択しない。",
        },
    },
    "blockllm_master": {
        "en": {
            "label": "Masters",
            "info": "fp32 (default: fp32 copies) or compensated (2-byte compensation, bf16/fp16 weights only).",
        },
        "ru": {
            "label": "Мастер-веса",
            "info": "fp32 (по умолчанию: копии fp32) или compensated (2-байтная компенсация, веса bf16/fp16).",
        },
        "zh": {"label": "主权重", "info": "fp32（默认：fp32 副本）或 compensated（2 字节补偿，仅 bf16/fp16 权重）。"},
        "ko": {
            "label": "마스터 가중치",
            "info": "fp32(기본값: fp32 사본) 또는 compensated(2바이트 보정, bf16/fp16 가중치만).",
        },
        "ja": {
            "label": "マスター重み",
            "info": "fp32（既定: fp32 コピー）または compensated（2 バイトの補正、bf16/fp16 重みのみ）。",
        },
    },
    "blockllm_keep": {
        "en": {
            "label": "Coordinates per block",
            "info": "fraction (default, paper: the same top fraction of each picked block) or threshold (one gradient "
            "threshold over them, from their norms).",
        },
        "ru": {
            "label": "Координаты на блок",
            "info": "fraction (по умолчанию, статья: одна доля каждого блока) или threshold (один порог градиента, "
            "по нормам блоков).",
        },
        "zh": {
            "label": "每块保留坐标",
            "info": "fraction（默认，论文：每块保留相同比例）或 threshold（按块范数估计的统一梯度阈值）。",
        },
        "ko": {
            "label": "블록당 좌표",
            "info": "fraction(기본값, 논문: 블록마다 같은 비율) 또는 "
            "threshold(블록 노름으로 추정한 하나의 기울기 임계값).",
        },
        "ja": {
            "label": "ブロックあたりの座標",
            "info": "fraction（既定、論文: 各ブロックで同じ割合）または "
            "threshold（ブロックのノルムから推定した共通の勾配しきい値）。",
        },
    },
}


def apply(module) -> None:
    check_llamafactory_version()
    clashes = sorted(set(BLOCKLLM_LOCALES) & set(module.LOCALES))
    if clashes:
        raise RuntimeError(f"LLaMA-Factory already defines web UI labels {clashes}; refusing to overwrite them")
    languages = module.LOCALES["finetuning_type"]  # the languages LLaMA-Factory labels its own elements in
    # A language this table lacks gets the English text rather than a blank label.
    module.LOCALES.update(
        {
            name: {language: entry.get(language, entry["en"]) for language in languages}
            for name, entry in BLOCKLLM_LOCALES.items()
        }
    )
