"""Small WSGI apps and gunicorn configs that tests/test_gunicorn.py serves with real gunicorn masters."""
