"""Memorization labels from LID estimates (the manifold memorization hypothesis), the
memorization metrics of text-conditional diffusion models, their differentiable prompt versions
with token attributions and mitigation (Stable Diffusion prompts: :mod:`.attribution`,
:mod:`.mitigation`), and the Jacobian-rank LID of GAN samples."""

# The modules first: `classify` is then rebound to the function of that name.
import mmh_jax.memorization.attribution as _attribution
import mmh_jax.memorization.classify as _classify
import mmh_jax.memorization.conditional as _conditional
import mmh_jax.memorization.gan as _gan
import mmh_jax.memorization.interventions as _interventions
import mmh_jax.memorization.mitigation as _mitigation
import mmh_jax.memorization.prompt as _prompt
import mmh_jax.memorization.signals as _signals
from mmh_jax.memorization.attribution import (
    METRICS,
    PromptAttribution,
    attribute_prompt,
    attribute_prompts,
    default_attribution_images,
    default_attribution_steps,
    metric_label,
)
from mmh_jax.memorization.classify import (
    DD_MEM,
    LABEL_NAMES,
    NOT_MEMORIZED,
    OD_MEM,
    Classification,
    classify,
    label_names,
)
from mmh_jax.memorization.conditional import (
    CFGNorms,
    ConditionalFlipd,
    conditional_flipd,
    generation_cfg_norms,
    image_cfg_norms,
)
from mmh_jax.memorization.gan import StyleGAN2Fns, gan_lid, stylegan2_fns
from mmh_jax.memorization.guard import (
    GuardedSample,
    GuardReport,
    PromptOutcome,
    Signal,
    calibrate_threshold,
    flag,
    guarded_ddim_sample,
    guarded_generate,
)
from mmh_jax.memorization.interventions import (
    INTERVENTIONS,
    PARTS,
    Part,
    deactivate_neurons,
    nemo_deactivation,
    nemo_neurons,
    rescale_begin_attention,
)
from mmh_jax.memorization.mitigation import (
    METHODS,
    ClipScorer,
    EmbeddingSettings,
    Method,
    MitigationConfig,
    MitigationResult,
    Similarity,
    check_prompt_tokens,
    embedding_defaults,
    expected_rows,
    method_label,
    mitigate,
    new_prompts,
    summarise_mitigation,
)
from mmh_jax.memorization.prompt import (
    EmbeddingOptimization,
    Metric,
    MetricPoints,
    TokenAttribution,
    metric_values,
    noised_points,
    optimize_embedding,
    optimize_embedding_traced,
    prompt_metric,
    token_attributions,
    trajectory_points,
)
from mmh_jax.memorization.rephrase import (
    ChatRephraser,
    RephraseOutcome,
    Rephraser,
    SynonymRephraser,
    choose_tokens,
    clip_vocabulary_words,
    random_token_addition,
    rephrase,
    selected_words,
    token_probabilities,
    uniform_tokens,
)
from mmh_jax.memorization.signals import memorized_when_high

# Each module's public names, and those of guard and rephrase that are not helpers of theirs
# (``step_probe_keys``, ``load_synonyms``, ``chat_instruction`` stay in their module).
__all__ = [
    *_classify.__all__,
    *_conditional.__all__,
    *_gan.__all__,
    *_prompt.__all__,
    *_signals.__all__,
    *_attribution.__all__,
    *_mitigation.__all__,
    *_interventions.__all__,
    "Rephraser",
    "RephraseOutcome",
    "SynonymRephraser",
    "ChatRephraser",
    "rephrase",
    "choose_tokens",
    "token_probabilities",
    "uniform_tokens",
    "selected_words",
    "random_token_addition",
    "clip_vocabulary_words",
    "Signal",
    "GuardedSample",
    "GuardReport",
    "PromptOutcome",
    "guarded_ddim_sample",
    "calibrate_threshold",
    "flag",
    "guarded_generate",
]
