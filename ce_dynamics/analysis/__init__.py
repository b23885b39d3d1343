"""Analysis of saved results: power-law fits and tables (``scaling``) and the paper's figures (``figures``)."""
