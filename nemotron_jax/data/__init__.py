"""data layer of nemotron-jax: tokenizers, the Nemotron-Cascade 2 chat template, record sources for the released
SFT / RL formats, and Grain pipelines (packed SFT batches, RL prompt batches) with resumable state."""

from nemotron_jax.data.chat_template import (
    ChatFormatError,
    ChatSegment,
    Message,
    RenderedChat,
    ToolCall,
    chat_stop_token_ids,
    encode_segments,
    format_tool_call,
    format_tools,
    normalize_messages,
    render_chat,
    render_chat_segments,
    render_chat_text,
    split_reasoning,
)
from nemotron_jax.data.packing import (
    PACKED_BATCH_KEYS,
    OverlongExampleError,
    PackResult,
    TokenizedExample,
    assign_rows,
    build_packed_rows,
    pack_examples,
    padding_fraction,
)
from nemotron_jax.data.pipeline import (
    PackedSFTBatches,
    PackedSFTBatchIterator,
    PackingStats,
    RLDataConfig,
    RLPrompt,
    RLPromptBatch,
    RLPromptBatches,
    RLPromptBatchIterator,
    RLPromptStats,
    SFTDataConfig,
    record_indices,
    resolve_shard,
    rl_prompt_dataset,
    sft_dataset,
)
from nemotron_jax.data.records import (
    REWARD_SPEC_FIELDS,
    BadRecord,
    RecordError,
    RecordRef,
    RLPromptRecord,
    SFTConversation,
    SourceRecord,
    agent_ref_name,
    decode_json,
    domain_from_agent_ref,
    parse_rl_prompt_record,
    parse_sft_record,
)
from nemotron_jax.data.sources import JsonlSource, ParquetSource, TfdsSource, open_source
from nemotron_jax.data.tokenizer import (
    CHAT_SPECIAL_TOKENS,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    train_sentencepiece,
)
