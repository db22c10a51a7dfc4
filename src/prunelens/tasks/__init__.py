"""Task evaluation: multiple choice by log-likelihood (and, later, generative tasks)."""
