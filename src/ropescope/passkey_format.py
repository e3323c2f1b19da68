"""The passkey retrieval format the field uses (Mohtashami & Jaggi 2023; the YaRN and PI evaluations).

One definition, shared by the synthetic examples mixed into pretraining and by the evaluation, so that the
shipped model is asked exactly what it was taught.
"""

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
KEY_DIGITS = 5
