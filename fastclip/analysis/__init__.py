"""The machinery behind :func:`fastclip.lipschitz_report`: the traced forward that finds
every layer's input shape and every Conv+BN composition, and the report's rows."""
